import dataclasses
import json
import shutil

import pytest
import torch
from conftest import TINY_TRANSFORMER, prepare_toy_data, set_options, toy_pairs, write_pairs
from nmt_cli.main import app
from typer.testing import CliRunner

from nmt.files import Manifest, VocabInfo

runner = CliRunner()

TINY = [
    *set_options("model", TINY_TRANSFORMER), *set_options("train", {"max_steps": 4, "batch_tokens": 300, "valid_every": 2}),
    "--no-progress",
]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments):
    assert result.exit_code != 0
    message = result.output.strip()
    assert "Traceback" not in message
    assert len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_pairs(root / "c" / "train", toy_pairs(200, seed=1))
    write_pairs(root / "c" / "valid", toy_pairs(10, seed=2))
    write_pairs(root / "c" / "test", toy_pairs(10, seed=3))
    result = invoke("prepare", "--train", root / "c" / "train", "--valid", root / "c" / "valid", "--test",
                    root / "c" / "test", "--src", "xx", "--tgt", "yy", "--vocab-size", "50", "--out", root / "data")
    assert result.exit_code == 0, result.output
    assert "cleaning: 200 pairs read" in result.output
    result = invoke("train", "--data", root / "data", "--out", root / "model", *TINY)
    assert result.exit_code == 0, result.output
    return root


def test_translate_keeps_one_line_per_input_line(trained):
    lines = ["w1 w2 w3", "", "   ", "w4 \u2028 w5", "w6 😀 ∑ 中文", "w7\tw8"]
    (trained / "in.txt").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    result = invoke("translate", trained / "model", "-i", trained / "in.txt", "-o", trained / "out.txt", "--beam", "3")
    assert result.exit_code == 0, result.output
    out = (trained / "out.txt").read_text(encoding="utf-8").split("\n")
    assert out[-1] == "" and len(out) - 1 == len(lines)
    assert out[1] == "" and out[2] == ""
    stdin = runner.invoke(app, ["translate", str(trained / "model"), "--beam", "1"], input="w1 w2\n\nw3\n")
    assert stdin.exit_code == 0 and len(stdin.stdout.split("\n")) == 4


def test_nbest_output(trained):
    (trained / "in2.txt").write_text("w1 w2\nw3\n")
    result = runner.invoke(app, ["translate", str(trained / "model"), "-i", str(trained / "in2.txt"),
                                 "--beam", "3", "--nbest", "2"])
    assert result.exit_code == 0, result.output
    rows = [line.split(" ||| ") for line in result.stdout.strip().split("\n")]
    assert [r[0] for r in rows] == ["0", "0", "1", "1"]
    one = runner.invoke(app, ["translate", str(trained / "model"), "-i", str(trained / "in2.txt"), "--beam", "3", "--nbest", "1"])
    plain = runner.invoke(app, ["translate", str(trained / "model"), "-i", str(trained / "in2.txt"), "--beam", "3"])
    assert [line.split(" ||| ")[:2] for line in one.stdout.splitlines()] == [["0", rows[0][1]], ["1", rows[2][1]]]
    assert plain.stdout.splitlines() == [rows[0][1], rows[2][1]]  # the best only, without scores


def test_evaluate_json_and_signatures(trained):
    result = invoke("evaluate", "--src", trained / "data" / "test.src.txt", "--model", trained / "model",
                    "--ref", trained / "data" / "test.tgt.txt", "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert [s["metric"] for s in scores] == ["bleu", "chrf", "ter"]
    assert scores[0]["signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    same = invoke("evaluate", "--hyp", trained / "data" / "test.tgt.txt", "--ref", trained / "data" / "test.tgt.txt")
    assert same.exit_code == 0 and "BLEU = 100.00" in same.output


def test_existing_model_needs_resume_or_overwrite(trained):
    result = invoke("train", "--data", trained / "data", "--out", trained / "model", *TINY)
    one_line_error(result, "already holds a model", "--resume", "--overwrite")
    resumed = invoke("train", "--data", trained / "data", "--out", trained / "model", *TINY[:-3],
                     "--set", "train.max_steps=6", "--resume", "--no-progress")
    assert resumed.exit_code == 0, resumed.output
    assert "trained 6 steps" in resumed.output


def test_checkpoint_that_does_not_match_the_data(trained, tmp_path):
    write_pairs(tmp_path / "o" / "train", toy_pairs(150, seed=9), src="xx", tgt="yy")
    assert invoke("prepare", "--train", tmp_path / "o" / "train", "--src", "xx", "--tgt", "yy", "--vocab-size",
                  "45", "--valid-size", "5", "--test-size", "5", "--out", tmp_path / "other").exit_code == 0
    result = invoke("train", "--data", tmp_path / "other", "--out", trained / "model", *TINY, "--resume")
    one_line_error(result, "different vocabulary")


def test_bad_inputs_give_one_line_errors(trained, tmp_path):
    one_line_error(invoke("prepare", "--train", tmp_path / "none", "--src", "a", "--tgt", "b", "--out", tmp_path / "x"),
                   "file not found")
    (tmp_path / "m.a").write_text("1\n2\n")
    (tmp_path / "m.b").write_text("1\n")
    one_line_error(invoke("prepare", "--train", tmp_path / "m", "--src", "a", "--tgt", "b", "--out", tmp_path / "x"),
                   "line counts differ")
    (tmp_path / "u.a").write_bytes(b"ok\n\xc3\x28\n")
    (tmp_path / "u.b").write_text("ok\nok\n")
    one_line_error(invoke("prepare", "--train", tmp_path / "u", "--src", "a", "--tgt", "b", "--out", tmp_path / "x"),
                   "u.a:2: invalid UTF-8")
    (tmp_path / "e.a").write_text("\n \n")
    (tmp_path / "e.b").write_text("x\n\n")
    one_line_error(invoke("prepare", "--train", tmp_path / "e", "--src", "a", "--tgt", "b", "--out", tmp_path / "x"),
                   "no sentence pairs left after cleaning")
    assert not (tmp_path / "x").exists()
    corpus = ["--train", trained / "c" / "train", "--src", "xx", "--tgt", "yy", "--out", tmp_path / "x"]
    for option, value, needed in (("--tsv-langs", "yy,xx", "--tsv"), ("--mono-langs", "xx", "--mono"),
                                  ("--hf-config", "xx-yy", "--hf"), ("--hf-revision", "main", "--hf"),
                                  ("--data-dir", tmp_path, "--corpus")):  # the last refused by the library
        one_line_error(invoke("prepare", *corpus, option, value), f"{option} goes with {needed}")
    for option, value, got in (("--max-ratio", "nan", "250 and nan"), ("--max-ratio", "0.5", "250 and 0.5"),
                               ("--max-ratio", "inf", "250 and inf"), ("--max-words", "0", "0 and 3.0")):
        one_line_error(invoke("prepare", *corpus, option, value), "--max-ratio a number of at least 1", f"(got {got})")
    assert not (tmp_path / "x").exists()
    one_line_error(invoke("train", "--data", trained / "data", "--out", tmp_path / "d0", "--device", "0"), "device '0'")
    (tmp_path / "bad.yaml").write_text("model:\n  n_layers: 3\n")
    one_line_error(invoke("train", tmp_path / "bad.yaml", "--data", trained / "data", "--out", tmp_path / "m"),
                   "unknown config key 'model.n_layers'")
    one_line_error(invoke("translate", tmp_path / "no-model", "-i", tmp_path / "e.a"), "not found")
    one_line_error(invoke("translate", trained / "model", "-i", tmp_path / "u.a"), "u.a:2: invalid UTF-8")
    one_line_error(invoke("evaluate", "--hyp", tmp_path / "m.a", "--ref", tmp_path / "m.b"), "line counts differ")
    one_line_error(invoke("translate", trained / "data", "-i", tmp_path / "e.a"), "not a checkpoint directory")
    for args, fragment in ((["translate", trained / "model", "--beam-size", "3"], "No such option: --beam-size"),
                           (["translate", trained / "model", "--beam", "abc"], "'--beam'"),
                           (["translate"], "Missing argument"), (["no-such-command"], "No such command")):
        usage = invoke(*args)
        one_line_error(usage, fragment, "--help")
        assert usage.exit_code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_but_absent(trained, tmp_path):
    one_line_error(invoke("train", "--data", trained / "data", "--out", tmp_path / "m", "--device", "cuda", *TINY),
                   "CUDA is not available")
    one_line_error(invoke("translate", trained / "model", "-i", trained / "data" / "test.src.txt", "--device", "cuda"),
                   "CUDA is not available")


def test_translate_writes_attention_heatmaps_alignments_and_weights(trained, tmp_path):
    from PIL import Image

    from nmt.alignment import AttentionMap
    from nmt.plots import DPI, heatmap_size

    lines = ["w1 w2 w3", "", "w4 w5", "w6 w7 w8 w9 w10 w11"]
    (tmp_path / "in.txt").write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "att"
    result = invoke("translate", trained / "model", "-i", tmp_path / "in.txt", "-o", tmp_path / "out.txt",
                    "--beam", "3", "--attention", out, "--json")
    assert result.exit_code == 0, result.output
    alignments = (out / "alignments.txt").read_text().split("\n")
    assert len(alignments) - 1 == len(lines) and alignments[1] == ""
    records = [json.loads(line) for line in (out / "attention.jsonl").read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 3, 4]
    assert sorted(p.name for p in out.glob("*.png")) == ["line-000001.png", "line-000003.png", "line-000004.png"]
    for record in records:
        weights = record["weights"]
        assert len(weights) == len(record["output"]) and all(len(row) == len(record["source"]) for row in weights)
        assert all(abs(sum(row) - 1) < 1e-3 for row in weights)
        assert record["source"][-1] == record["output"][-1] == "</s>"
        assert "transformer, decoder layer 1 of 1, mean of 2 heads" == record["attention"]
        for pair in alignments[record["line"] - 1].split():
            i, j = map(int, pair.split("-"))
            assert 0 <= i < len(record["source"]) - 1 and 0 <= j < len(record["output"]) - 1
        with Image.open(out / f"line-{record['line']:06d}.png") as image:
            width, height, _ = heatmap_size(AttentionMap(record["line"], record["source"], record["output"], None))
            assert image.size == (round(width * DPI), round(height * DPI))
    few = invoke("translate", trained / "model", "-i", tmp_path / "in.txt", "-o", tmp_path / "out2.txt",
                 "--attention", tmp_path / "few", "--attention-lines", "1", "--attention-words", "--attention-head", "2")
    assert few.exit_code == 0, few.output
    assert [p.name for p in (tmp_path / "few").glob("*.png")] == ["line-000001.png"]
    assert len((tmp_path / "few" / "alignments.txt").read_text().splitlines()) == len(lines)
    one_line_error(invoke("translate", trained / "model", "-i", tmp_path / "in.txt", "--json"), "need --attention DIR")
    one_line_error(invoke("translate", trained / "model", "-i", tmp_path / "in.txt", "--attention", tmp_path / "x",
                          "--attention-layer", "2"), "attention layer 2 does not exist")
    assert not (tmp_path / "x").exists()  # a refused run leaves no folder behind
    into_new = invoke("translate", trained / "model", "-i", tmp_path / "in.txt", "--attention", tmp_path / "new",
                      "-o", tmp_path / "new" / "out.txt")  # -o in the folder --attention makes
    assert into_new.exit_code == 0 and (tmp_path / "new" / "out.txt").is_file(), into_new.output
    # refused before the first line is written, though that line (empty) needs no attention
    late = runner.invoke(app, ["translate", str(trained / "model"), "--stream", "--attention", str(tmp_path / "y"),
                               "--attention-head", "3"], input="\nw1 w2\n")
    assert late.exit_code == 1 and late.stdout == "" and "attention head 3 does not exist" in late.output


def test_plot_draws_training_curves_of_several_runs(trained, tmp_path):
    from PIL import Image

    from nmt.plots import DPI

    second = tmp_path / "run2"
    second.mkdir()
    records = [{"type": "train", "step": s, "loss": 3.0 / s, "lr": 1e-3} for s in (1, 2, 3)]
    records.append({"type": "valid", "step": 3, "loss": 1.5, "ppl": 4.5, "bleu": 12.0})
    (second / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = invoke("plot", trained / "model", second, "-o", tmp_path / "curves.png")
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "curves.png") as image:
        assert image.size == (15 * DPI, round(4.5 * DPI))
    one_line_error(invoke("plot", tmp_path / "nothing", "-o", tmp_path / "c.png"), "no train_log.jsonl")
    fresh = tmp_path / "fresh"  # stopped before its first validation, an interval with every update skipped
    fresh.mkdir()
    records = [{"type": "train", "step": 1, "loss": None, "lr": 1e-3}, {"type": "train", "step": 2, "loss": 2.0, "lr": 1e-3}]
    (fresh / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's warning about a legend without curves
        result = invoke("plot", fresh, "-o", tmp_path / "fresh.png")
    assert result.exit_code == 0 and len(result.output.strip().splitlines()) == 1, result.output


def test_translate_precision_option(trained):
    (trained / "p.txt").write_text("w1 w2\n\nw3\n", encoding="utf-8")
    result = invoke("translate", trained / "model", "-i", trained / "p.txt", "--precision", "bf16", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert len(result.output.splitlines()) == 3
    one_line_error(invoke("translate", trained / "model", "-i", trained / "p.txt", "--precision", "fp64"),
                   "decode.precision must be one of fp32, bf16, fp16")


def test_command_summaries_are_single_sentences():
    import typer.main

    commands = typer.main.get_command(app).commands
    assert {"prepare", "train", "translate", "evaluate", "pretrain", "fill-mask"} <= set(commands)
    for name, command in commands.items():
        summary = command.help.strip().split("\n\n")[0]
        assert "\n" not in summary and summary.endswith(".") and summary.count(". ") == 0, name


@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_devices_relaunches_the_command_line_as_typed(command, monkeypatch, tmp_path):
    import nmt.train

    (tmp_path / "cfg.yaml").write_text("train:\n  device: cpu\n")  # read first: a wrong config fails once, here
    (tmp_path / "mono.xx").write_text("w1 w2\n", encoding="utf-8")
    inputs = ["--data", str(prepare_toy_data(tmp_path, train=30))] if command == "train" else ["--text", str(tmp_path / "mono.xx")]
    typed = [command, str(tmp_path / "cfg.yaml"), *inputs, "--out", str(tmp_path / "m"), "--devices", "2",
             "--set", "train.lr=0.1", "--no-progress", "--overwrite"]
    launched = []
    monkeypatch.setattr(nmt.train, "start_processes", lambda devices, line, device: launched.append((devices, line, device)) or 0)
    monkeypatch.setattr("sys.argv", ["nmt", *typed])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = invoke(*typed)
    assert result.exit_code == 0, result.output
    assert launched == [(2, typed, "cpu")]
    assert "trained" not in result.output  # the processes report the run, not the one that started them
    monkeypatch.setattr(nmt.train, "start_processes", lambda devices, line, device: 3)  # torchrun's status when a worker failed
    assert invoke(*typed).exit_code == 3


def test_chrf_and_ter_are_sacrebleus_defaults():
    """chrF as published (character 6-grams, beta 2, no word n-grams: not chrF++) and TER with
    sacreBLEU's default options (case-insensitive, punctuation kept, not normalized), with
    their signatures and the values sacreBLEU gives."""
    from sacrebleu.metrics import CHRF, TER

    from nmt.evaluate import score_texts

    hypotheses = ["A small dog runs on grass .", "two men talk"]
    references = ["a little dog runs in the grass!", "Two men are talking."]
    chrf, ter = score_texts(hypotheses, references, ("chrf", "ter"))
    assert "nc:6|nw:0" in chrf.signature and "chrF2" in chrf.text
    assert chrf.score == pytest.approx(CHRF().corpus_score(hypotheses, [references]).score)
    default_ter = TER()
    assert ter.score == pytest.approx(default_ter.corpus_score(hypotheses, [references]).score)
    assert ter.signature == str(default_ter.get_signature()) and "case:lc|tok:tercom|norm:no|punct:yes" in ter.signature


def test_evaluate_data_takes_a_language_code_with_a_hyphen(trained, tmp_path):
    """prepare takes codes such as zh-TW for a bilingual data dir; its one direction is not split
    at each hyphen."""
    data, model = tmp_path / "data", tmp_path / "model"
    shutil.copytree(trained / "data", data)
    shutil.copytree(trained / "model", model)
    dataclasses.replace(Manifest.read(data), src_lang="xx-XA").write(data)
    dataclasses.replace(VocabInfo.read(model), src_lang="xx-XA").write(model)
    result = invoke("evaluate", "--data", data, "--model", model, "--json", "--metrics", "bleu")
    assert result.exit_code == 0, result.output
    assert [d["direction"] for d in json.loads(result.stdout)["directions"]] == ["xx-XA-yy"]


def test_an_os_error_is_one_line(trained, tmp_path):
    """A name longer than the file system takes, a full disk: one line, not a traceback."""
    long_name = tmp_path / ("x" * 300)
    result = invoke("prepare", "--train", trained / "c" / "train", "--src", "xx", "--tgt", "yy", "--vocab-size", "50",
                    "--out", long_name)
    one_line_error(result, "name too long")


def test_several_processes_are_refused_before_torchrun_starts_them(trained, monkeypatch):
    """Each process would print the refusal, among torchrun's own lines: one line instead."""
    import nmt.train

    def launched(*args):
        raise AssertionError("torchrun started")

    monkeypatch.setattr(nmt.train, "start_processes", launched)
    args = ["train", "--data", trained / "data", "--out", trained / "model", "--devices", "2", "--device", "cpu"]
    one_line_error(invoke(*args, *TINY), "already holds a model")
    one_line_error(invoke(*args, *TINY, "--resume", "--set", "model.ff_dim=48"), "model.ff_dim is 48")
    one_line_error(invoke(*args, *TINY, "--resume", "--overwrite"), "exclude each other")


def test_a_process_torchrun_started_trains_instead_of_starting_others(monkeypatch, tmp_path):
    """torchrun sets WORLD_SIZE in each process it starts: they must not start processes again."""
    import nmt.pretrain
    import nmt.train

    monkeypatch.setattr(nmt.train, "start_processes", lambda *args: pytest.fail("torchrun started again"))
    monkeypatch.setattr(nmt.train, "run_training", lambda *args: "trained")
    monkeypatch.setenv("WORLD_SIZE", "2")
    from nmt.config import config_from_dict
    from nmt.distributed import Launch

    config = config_from_dict({"data_dir": str(prepare_toy_data(tmp_path, train=30)), "save_dir": str(tmp_path / "m")})
    assert nmt.train.train(config, launch=Launch(2, ["train"])) == "trained"
    monkeypatch.setattr(nmt.pretrain, "run_training", lambda *args: "pretrained")
    config.data_dir = ""
    (tmp_path / "mono.xx").write_text("w1 w2\n", encoding="utf-8")
    assert nmt.pretrain.pretrain(config, [tmp_path / "mono.xx"], launch=Launch(2, ["pretrain"])) == "pretrained"
    monkeypatch.delenv("WORLD_SIZE")
    assert not Launch(1, ["train"]).starts_processes and Launch(2, ["train"]).starts_processes
