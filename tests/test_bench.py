import dataclasses
import json
import statistics

import pytest
import torch
import yaml
from conftest import TINY_RNN, TINY_TRANSFORMER, toy_pairs, write_multi30k_toy, write_pairs
from nmt_cli.main import app
from typer.testing import CliRunner

from nmt.bench import BenchConfig, format_report, run_bench
from nmt.devices import cpu_multiplies_natively
from nmt.errors import DataError
from nmt.files import VocabInfo, Vocabulary

TINY_RECIPES = {"transformer": TINY_TRANSFORMER, "rnn": {**TINY_RNN, "cell": "lstm"}}


@pytest.fixture
def bench_inputs(tmp_path):
    """A toy corpus under Multi30k's file names, and tiny configs for both model families."""
    corpus = write_multi30k_toy(tmp_path / "m30k")
    recipes = {}
    for name, model in TINY_RECIPES.items():
        recipes[name] = tmp_path / f"{name}.yaml"
        recipes[name].write_text(yaml.safe_dump({
            "model": model,
            "train": {"batch_tokens": 200, "lr": 3e-3, "warmup_steps": 10, "device": "cpu"},
            "decode": {"beam": 5},
        }))
    return corpus, recipes


@pytest.mark.slow
def test_bench_measures_every_section_against_its_baseline(bench_inputs, tmp_path):
    corpus, recipes = bench_inputs
    config = BenchConfig(data=corpus, out=tmp_path / "out" / "bench.json", recipes=recipes, device="cpu", steps=3,
                         repeats=2, vocab_size=40, ttq_bleu=90.0, ttq_minutes=0.1, ttq_valid_every=5,
                         cpu_bf16_training=True)
    report = run_bench(config, log=lambda message: None)
    assert json.loads(config.out.read_text()) == json.loads(json.dumps(report))
    assert report["torch"] and report["device"] and report["configs"]["rnn"]["model"]["cell"] == "lstm"

    train = {(r["model"], r["path"], r["dtype"]): r for r in report["train"]}
    passes = {("plain", "float32"), ("nmt", "float32"), ("nmt", "bfloat16")}  # bf16: asked for on this CPU
    assert set(train) == {(m, p, d) for m in recipes for p, d in passes}
    for record in train.values():
        assert record["updates"] == 3 and len(record["seconds_all_repeats"]) == 2
        assert record["tokens_per_s"] > record["tgt_tokens_per_s"] > 0
        assert record["seconds_per_update"] * 3 == pytest.approx(statistics.median(record["seconds_all_repeats"]))
    for path, dtype in passes:  # model FLOPs are counted for the Transformer
        record = train[("transformer", path, dtype)]
        assert record["flops_per_s"] > 0 and record["mfu_of_measured_matmul"] > 0
        if cpu_multiplies_natively(getattr(torch, dtype)):  # else the measured bf16 product is emulated, no ceiling
            assert record["mfu_of_measured_matmul"] < 1
    assert set(report["matmul"]) == {"float32", "bfloat16"}
    for model in recipes:
        record = train[(model, "nmt", "bfloat16")]
        fp32 = train[(model, "nmt", "float32")]
        assert record["speed_vs_nmt_fp32"] == pytest.approx(record["tgt_tokens_per_s"] / fp32["tgt_tokens_per_s"])

    for record in report["time_to_quality"]:
        assert record["curve"] and record["curve"][0]["step"] == 5
        if record["reached"]:
            assert record["train_seconds"] <= record["trained_seconds"]
            assert record["updates"] % 5 == 0
        assert "test_bleu_beam5" in record

    decode = {(r["model"], r["path"], r["beam"]): r for r in report["decode"]}
    exported = {("transformer", p, 5) for p in ("ct2", "ct2-int8")}  # CTranslate2 has no RNN decoder
    static = {("transformer", "nmt-static", b) for b in (1, 5)}  # fixed-shape steps: Transformers only
    assert set(decode) == {(m, p, b) for m in recipes for p in ("plain", "nmt", "nmt-int8") for b in (1, 5)} | exported | static
    for key in static:  # the same translations as the incremental path
        assert decode[key]["lines_differing_from_fp32"] == 0 and decode[key]["lines_differing_from_plain"] == 0
    for key in exported:
        speed = decode[("transformer", "nmt", 5)]["seconds"] / decode[key]["seconds"]  # above 1: faster than nmt
        assert decode[key]["speed_vs_nmt_fp32"] == pytest.approx(speed) and 0 <= decode[key]["lines_differing_from_nmt_fp32"] <= 20
    for (_, path, _), record in decode.items():
        assert record["sentences"] == 20 and record["sentences_per_s"] > 0
        assert record["repeats"] == len(record["seconds_all_repeats"]) == (1 if path == "plain" else 2)
        assert record["seconds"] == pytest.approx(statistics.median(record["seconds_all_repeats"]))
        assert record["sentences_per_s"] == pytest.approx(20 / record["seconds"])
        if path == "nmt":  # the incremental path translates exactly as the plain one
            assert record["lines_differing_from_plain"] == 0

    table = format_report(report)
    assert "training" in table and "decoding test_2016_flickr" in table and "time to quality" in table
    assert "transformer ct2-int8 (int8) beam 5:" in table
    assert "rnn nmt step in bfloat16:" in table
    eager = sum(decode[key]["cuda_graphs"]["eager_steps"] for key in static if key[2] == 5)  # the CPU has no graphs
    assert eager > 0 and f"transformer nmt-static beam 5: 0 steps replayed as CUDA graphs, {eager:,} eager" in table


def test_bench_cli_reports_bad_input_in_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "--data", str(tmp_path / "nowhere"), "--device", "cpu"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "not found" in result.output and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["bench", "--sections", "train,speed", "--device", "cpu"])
    assert result.exit_code == 1 and "unknown bench section" in result.output
    result = runner.invoke(app, ["bench", "--sections", ",", "--device", "cpu", "--out", str(tmp_path / "b.json")])
    assert result.exit_code == 1 and "no bench section given" in result.output
    result = runner.invoke(app, ["bench", "--recipe", "transformer", "--device", "cpu"])
    assert result.exit_code == 1 and "NAME=PATH" in result.output
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path, tmp_path / "afile" / "bench.json"):  # refused before anything is measured
        result = runner.invoke(app, ["bench", "--device", "cpu", "--data", str(tmp_path / "nowhere"), "--out", str(out)])
        assert result.exit_code == 1 and "cannot write" in result.output and len(result.output.strip().splitlines()) == 1


def test_bench_commands_check_their_inputs_and_outputs_first(bench_inputs, tmp_path, monkeypatch):
    from nmt.bench import plan_bench

    corpus, recipes = bench_inputs
    runner = CliRunner()
    write_pairs(tmp_path / "m30k-train" / "train", toy_pairs(300, seed=1), "de", "en")
    scale = ["bench-scale", "--data", str(tmp_path / "m30k-train"), "--pairs", "200", "--ratio", "2"]
    vocab = Vocabulary("spm.joint.model", "spm.joint.model", 40, 40, "a", "a")
    for name, info in (("fr-en", VocabInfo(vocab, src_lang="fr", tgt_lang="en")), ("de-en", VocabInfo(vocab, src_lang="de", tgt_lang="en")),
                       ("many", VocabInfo(vocab, src_lang="de+en", tgt_lang="de+en", directions=["de-en", "en-de"]))):
        (tmp_path / name).mkdir()
        info.write(tmp_path / name)
    bench = ["bench", "--data", str(corpus), "--device", "cpu", "--checkpoint"]
    for args, named in [([*bench, f"transformer={tmp_path / 'fr-en'}"], "is a fr→en model; nmt bench decodes Multi30k de→en"),
                        ([*bench, f"transformer={tmp_path / 'many'}"], "is a multilingual de+en→de+en model"),
                        ([*bench, f"transformer={tmp_path / 'nowhere'}"], "nowhere"),([*scale, "--out", str(tmp_path)], "cannot write"), ([*scale, "--steps", "0"], "--steps"),
                        ([*scale, "--translate", str(tmp_path / "de-en"), "--beam", "0"], "--beam must be at least 1"),
                        ([*scale, "--work-dir", str(tmp_path / "m30k-train" / "train.de")], "--work-dir"),
                        ([*scale, "--work-dir", str(tmp_path / "de-en")], "is not empty"),  # a model, say
                        (["bench-serve", str(tmp_path / "model"), "--lines", "-1"], "--lines must be at least 1"),
                        (["bench-serve", str(tmp_path / "model"), "--out", str(tmp_path)], "cannot write"),
                        (["bench", "--data", str(corpus), "--device", "cpu", "--checkpoint", f"typo={tmp_path}"],
                         "--checkpoint typo: no recipe of that name"),
                        ([*bench, f"transformer={tmp_path / 'de-en'}", "--out", str(tmp_path / "de-en" / "config.yaml")],
                         "is inside"),  # the report would replace a file of the model it decodes
                        (["bench-serve", str(tmp_path / "de-en"), "--out", str(tmp_path / "de-en" / "vocab.json")], "is inside"),
                        # nor over a recipe it trains, the corpus it reads or the model bench-scale translates
                        (["bench", "--data", str(corpus), "--device", "cpu", "--recipe", f"transformer={recipes['transformer']}",
                          "--out", str(recipes["transformer"])], "it is the input"),
                        ([*scale, "--out", str(tmp_path / "m30k-train" / "train.de")], "is inside"),
                        ([*scale, "--translate", str(tmp_path / "de-en"), "--out", str(tmp_path / "de-en" / "config.yaml")], "is inside"),
                        (["bench", "--data", str(corpus), "--device", "cpu", "--ttq-minutes", "nan"], "--ttq-minutes must be")]:
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and named in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    # The default recipes are found from any working directory.
    monkeypatch.chdir(tmp_path)
    plan = plan_bench(BenchConfig(data=corpus, out=tmp_path / "b.json", device="cpu"))
    assert set(plan.configs) == {"transformer", "rnn"}


@pytest.mark.slow
def test_scale_bench_reports_both_corpus_sizes_and_their_ratios(tmp_path):
    from nmt.bench_scale import ScaleBenchConfig, run_scale_bench

    write_pairs(tmp_path / "m30k" / "train", toy_pairs(300, seed=1), "de", "en")
    report = run_scale_bench(ScaleBenchConfig(data=tmp_path / "m30k", pairs=2000, ratio=10, steps=3, vocab_size=60,
                                              out=tmp_path / "scale.json", work_dir=tmp_path / "work"))
    assert json.loads((tmp_path / "scale.json").read_text()) == report
    for size, pairs in (("large", 2000), ("small", 200)):
        figures = report[size]
        assert figures["pairs"] == pairs and 0 < figures["train_pairs"] < pairs  # valid/test and duplicates left out
        # bytes: a process that imports torch holds far more than 20 MiB
        assert figures["prepare_peak_rss_bytes"] > 20 * 2**20 and figures["train_peak_rss_bytes"] > 20 * 2**20
        assert (tmp_path / "work" / size / "data" / "manifest.json").is_file()  # a --work-dir is kept
        assert 0 < figures["train_setup_seconds"] < figures["train_startup_seconds"] < figures["train_seconds"]
        assert set(figures["prepare_stage_seconds"]) == {"read_clean", "dedup_split", "sentencepiece", "encode", "valid_test"}
    assert report["ratio_large_to_small"]["data_dir_bytes"] > 1
    with pytest.raises(DataError, match="--pairs / --ratio too"):
        run_scale_bench(ScaleBenchConfig(data=tmp_path / "m30k", pairs=500, ratio=10))


@pytest.mark.slow
def test_time_to_quality_reports_when_the_dev_bleu_first_reached_the_threshold(tmp_path):
    from conftest import prepare_toy_data

    from nmt.bench import bench_time_to_quality
    from nmt.config import config_from_dict

    data_dir = prepare_toy_data(tmp_path, train=300, valid=20)
    config = config_from_dict({
        "model": {"embed_dim": 64, "ff_dim": 128, "heads": 4, "enc_layers": 2, "dec_layers": 2, "dropout": 0.0},
        "train": {"batch_tokens": 500, "lr": 3e-3, "warmup_steps": 20, "label_smoothing": 0.0, "device": "cpu"},
    })
    record = bench_time_to_quality("transformer", config, data_dir, tmp_path / "m", threshold=30.0, minutes=3.0,
                                   valid_every=20, log=lambda message: None)
    assert record["reached"], record["curve"]
    first = next(r for r in record["curve"] if r["bleu"] >= 30.0)
    assert record["updates"] == first["step"] == record["curve"][-1]["step"]  # training stopped there
    assert 0 < record["train_seconds"] <= record["trained_seconds"] and record["train_seconds"] == first["train_seconds"]


@pytest.mark.slow
def test_scale_bench_of_monolingual_text(tmp_path):
    from nmt.bench_scale import ScaleBenchConfig, run_scale_bench

    write_pairs(tmp_path / "m30k" / "train", toy_pairs(300, seed=1), "de", "en")
    report = run_scale_bench(ScaleBenchConfig(data=tmp_path / "m30k", pairs=2000, ratio=10, steps=3, vocab_size=60,
                                              mono=True))
    assert report["kind"] == "monolingual"
    for size, sentences in (("large", 2000), ("small", 200)):
        figures = report[size]
        assert figures["sentences"] == sentences and 0 < figures["train_sentences"] < sentences
        assert 0 < figures["train_setup_seconds"] < figures["train_startup_seconds"] < figures["train_seconds"]


def test_stream_latency_figures_are_percentiles_of_the_latencies():
    from nmt.bench_scale import latency_figures

    assert latency_figures([0.4, 0.1, 0.3, 0.2]) == {"median_seconds": 0.25, "p90_seconds": 0.37, "max_seconds": 0.4}
    assert latency_figures([float(s) for s in range(1, 11)])["p90_seconds"] == 9.1  # not the maximum, 10


def test_an_interrupted_bench_writes_what_it_measured(bench_inputs, tmp_path, monkeypatch):
    import nmt.bench

    corpus, recipes = bench_inputs

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(nmt.bench, "training_section", interrupted)
    out = tmp_path / "bench.json"
    with pytest.raises(KeyboardInterrupt):
        run_bench(BenchConfig(data=corpus, out=out, recipes=recipes, sections=("train",), device="cpu", repeats=1,
                              vocab_size=40, work_dir=tmp_path / "work"), log=lambda message: None)
    report = json.loads(out.read_text())
    assert report["interrupted"] and report["matmul"]


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H200", 989.4e12), ("NVIDIA H200 NVL", 835.5e12),
    ("NVIDIA H100 NVL", 835.5e12), ("NVIDIA H100 PCIe", 756.5e12), ("NVIDIA GeForce RTX 4090", None),
])
def test_mfu_divides_by_the_peak_of_the_card_named_not_of_its_namesake(name, peak, monkeypatch):
    from nmt.bench import datasheet_peak

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert datasheet_peak(torch.device("cuda"), torch.bfloat16) == peak


def test_a_work_dirs_model_is_decoded_again_only_if_its_recipe_and_data_built_it(tmp_path):
    from conftest import TINY_TRANSFORMER, prepare_toy_data, train_tiny

    from nmt.bench import trained_before
    from nmt.checkpoint import read_config

    data = prepare_toy_data(tmp_path, train=100)
    model = train_tiny(data, tmp_path / "model", TINY_TRANSFORMER, max_steps=4, valid_every=2)
    config = read_config(model)
    assert trained_before(model, config, data)
    wider = dataclasses.replace(config, model=dataclasses.replace(config.model, embed_dim=64))
    assert not trained_before(model, wider, data)  # the recipe changed
    assert not trained_before(model, config, prepare_toy_data(tmp_path / "other", train=100, joint_vocab=False))
    assert not trained_before(tmp_path / "nothing", config, data)


def test_a_rows_peak_memory_leaves_out_the_peaks_of_the_rows_before_it():
    import subprocess
    import sys

    # A process of its own: the glibc settings of an earlier CPU training in this one would keep
    # the freed memory resident.
    script = """
import numpy as np, torch
from nmt.bench import peak_memory_mb, reset_peak_memory
cpu = torch.device("cpu")
earlier = np.ones(400 * 2**20 // 8)  # 400 MB resident, then freed
del earlier
reset_peak_memory(cpu)
before = peak_memory_mb(cpu)
row = np.ones(50 * 2**20 // 8)
print(peak_memory_mb(cpu) - before)
"""
    grown = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert 45 < grown < 100  # this row's 50 MB; not the 400 before it


def test_on_a_gpu_a_rows_peak_is_the_allocators_own_in_mebibytes(monkeypatch):
    from nmt.bench import peak_memory_mb, reset_peak_memory

    allocated, resets = [3 * 2**30], []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocated[0])
    gpu = torch.device("cuda", 0)
    reset_peak_memory(gpu)
    assert resets == [gpu] and peak_memory_mb(gpu) == 3072.0


def test_a_stopped_scale_bench_stops_the_command_it_measures(tmp_path):
    import os
    import signal
    import sys

    from nmt.bench_scale import _run_measured

    pid_file = tmp_path / "pid"
    command = [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"]

    def stop(signum, frame):  # as the SIGTERM handler of the command line does
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, 3.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            _run_measured(command)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    with pytest.raises(ProcessLookupError):  # gone, not left running
        os.kill(int(pid_file.read_text()), 0)


def test_the_plain_training_baseline_is_plain_pytorch_and_nmts_step_its_own(tmp_path, monkeypatch):
    """The "vs plain" ratio is against fp32 PyTorch with its own masks, an unfused optimizer and no
    compiling, whatever the recipe asks for; nmt's step takes the recipe's precision, fusing and
    compiling."""
    from conftest import prepare_toy_data

    import nmt.bench
    from nmt.bench import bench_training
    from nmt.config import config_from_dict
    from nmt.data import ParallelSplit

    data = prepare_toy_data(tmp_path, train=40)
    config = config_from_dict({"data_dir": str(data), "model": TINY_TRANSFORMER,
                               "train": {"precision": "bf16", "compile": True, "batch_tokens": 200}})
    calls = []
    monkeypatch.setattr(nmt.bench, "use_torch_masks", lambda model: calls.append("torch masks"))
    monkeypatch.setattr(nmt.bench, "keep_freed_memory", lambda: calls.append("keep freed memory"))
    monkeypatch.setattr(nmt.bench, "compile_model", lambda model: calls.append("compiled") or model)
    make_optimizer = nmt.bench.make_optimizer
    monkeypatch.setattr(nmt.bench, "make_optimizer", lambda model, tc, fused: calls.append(f"fused {fused}")
                        or make_optimizer(model, tc, fused=fused))
    split = ParallelSplit.load(data, "train")
    plain = bench_training("transformer", config, split, (40, 40), torch.device("cpu"), True, steps=1, repeats=1)
    assert (plain["dtype"], plain["path"], plain["compiled"], calls) == ("float32", "plain", False, ["torch masks", "fused False"])
    calls.clear()
    nmt_step = bench_training("transformer", config, split, (40, 40), torch.device("cpu"), False, steps=1, repeats=1)
    assert (nmt_step["dtype"], nmt_step["path"], calls) == ("bfloat16", "nmt", ["keep freed memory", "fused True", "compiled"])


def test_the_report_gives_each_path_its_speed_against_the_plain_one():
    """'vs plain' is how many times faster than the plain PyTorch path: target tokens/s over the
    plain ones in training, the plain seconds over the path's in decoding."""
    from nmt.bench import format_report

    def train_row(path, tokens):
        return {"model": "transformer", "path": path, "dtype": "float32", "tgt_tokens_per_s": tokens,
                "tokens_per_s": 2 * tokens, "flops_per_s": None, "peak_memory_mb": 100.0}

    def decode_row(path, seconds):
        return {"model": "transformer", "path": path, "precision": "fp32", "beam": 5, "sentences": 20,
                "seconds": seconds, "sentences_per_s": 20 / seconds, "tokens_per_s": 100 / seconds, "bleu": 10.0,
                "lines_differing_from_plain": 0}

    report = {"nmt_version": "0", "torch": "2", "device": "cpu", "matmul": {}, "time_to_quality": [],
              "train": [train_row("plain", 1000.0), train_row("nmt", 3000.0)],
              "decode": [decode_row("plain", 8.0), decode_row("nmt", 2.0)]}
    lines = format_report(report).splitlines()
    nmt_train = next(line for line in lines if line.startswith("transformer") and " nmt " in line and "float32" in line)
    nmt_decode = next(line for line in lines if line.startswith("transformer") and " nmt " in line and "2.00" in line)
    assert "3.00x" in nmt_train and "4.00x" in nmt_decode
