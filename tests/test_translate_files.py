"""`nmt translate` on files and pipes (chunks, --stream, --prefix, ensembles) and `nmt average`."""

import gzip
import json
import os
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_RNN, TINY_TRANSFORMER, assert_one_line_error, prepare_toy_data, toy_pairs, train_tiny
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cli.main import app
from nmt.average import average_weights
from nmt.checkpoint import prune_update_checkpoints, update_checkpoint_name, update_checkpoints
from nmt.errors import CheckpointError, ConfigError
from nmt.files import CheckpointInfo, TrainState
from nmt.translate import translate_file

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A data dir, a Transformer that keeps its last 2 and best 2 checkpoints, and an RNN."""
    root = tmp_path_factory.mktemp("decoding")
    data = prepare_toy_data(root, train=200)
    transformer = train_tiny(data, root / "transformer", TINY_TRANSFORMER, keep_last=2, keep_best=2)
    rnn = train_tiny(data, root / "rnn", TINY_RNN)
    return root, transformer, rnn


def _lines(count: int, seed: int = 5) -> list[str]:
    return [src for src, _ in toy_pairs(count, seed=seed)]


def test_chunks_give_the_output_of_the_whole_file_at_once(trained, tmp_path):
    _, model_dir, _ = trained
    source = tmp_path / "in.txt"
    source.write_text("".join(line + "\n" for line in [*_lines(20), "", *_lines(7, seed=6)]), encoding="utf-8")
    outputs = {}
    for chunk in (3, 10_000):
        out = tmp_path / f"out-{chunk}.txt"
        count = translate_file(model_dir, source, out, {"chunk_lines": chunk, "beam": 3, "nbest": 2}, device="cpu")
        assert count == 28
        outputs[chunk] = out.read_text(encoding="utf-8")
    assert outputs[3] == outputs[10_000]
    assert [int(line.split(" ||| ")[0]) for line in outputs[3].splitlines()][::2] == list(range(28))


def test_stream_answers_each_line_before_the_next_is_written(trained):
    _, model_dir, _ = trained
    # Python's own buffering, as a pipe gets it: --stream must flush each answer itself.
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "translate", str(model_dir), "--stream", "--device", "cpu"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, text=True, bufsize=1,
        env=environment,
    )
    try:
        answers = []
        for line in [*_lines(3), ""]:
            process.stdin.write(line + "\n")
            process.stdin.flush()
            ready, _, _ = select.select([process.stdout], [], [], 60)
            assert ready, f"no translation of {line!r} within 60 s of writing it"
            answers.append(process.stdout.readline())
        process.stdin.close()
        assert process.wait(timeout=60) == 0, process.stderr.read()
    finally:
        process.kill()
    assert all(answer.endswith("\n") for answer in answers) and answers[-1] == "\n"
    batch = runner.invoke(app, ["translate", str(model_dir), "--device", "cpu"], input="".join(f"{s}\n" for s in _lines(3)))
    assert "".join(answers[:3]) == batch.output


def test_a_prefix_ending_in_a_space_is_followed_by_a_new_word(trained, tmp_path):
    """SentencePiece drops a final space, so without the rule "V " is the piece of "V", which the
    toy model goes on with ("V2"): the user asked for the word "V" and then another."""
    _, model_dir, _ = trained
    source, prefixes = tmp_path / "in.txt", tmp_path / "prefix.txt"
    source.write_text("w1 w2\nw1 w2\nw3 w4 w5\n", encoding="utf-8")
    prefixes.write_text("V\nV \nV9 \n", encoding="utf-8")
    for beam in ("1", "3"):
        result = runner.invoke(app, ["translate", str(model_dir), "-i", str(source), "--prefix", str(prefixes),
                                     "--beam", beam, "--device", "cpu"])
        assert result.exit_code == 0, result.output
        open_word, new_word, after_v9 = result.output.splitlines()
        assert open_word.startswith("V") and open_word.split()[0] != "V"  # the rule matters for this line
        assert new_word.split()[0] == "V" and after_v9.split()[0] == "V9"


def test_prefix_file_forces_the_start_of_each_translation(trained, tmp_path):
    _, model_dir, _ = trained
    source, prefixes = tmp_path / "in.txt", tmp_path / "prefix.txt"
    source.write_text("w1 w2 w3\nw4 w5\nw6\n", encoding="utf-8")
    prefixes.write_text("V9 V9\n\nV0\n", encoding="utf-8")
    result = runner.invoke(app, ["translate", str(model_dir), "-i", str(source), "--prefix", str(prefixes), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    first, second, third = result.output.splitlines()
    assert first.startswith("V9 V9") and third.startswith("V0")
    free = runner.invoke(app, ["translate", str(model_dir), "--device", "cpu"], input="w4 w5\n")
    assert second == free.output.strip()  # an empty prefix line leaves that line free
    whole = runner.invoke(app, ["translate", str(model_dir), "-i", str(source), "--prefix", str(prefixes), "--prefix-only",
                                "--device", "cpu"])
    assert whole.output.splitlines() == ["V9 V9", second, "V0"]  # each prefix is the whole translation
    prefixes.write_text("V9 漢 V0\n\n\n", encoding="utf-8")  # a character the vocabulary lacks: said, not hidden
    unknown = runner.invoke(app, ["translate", str(model_dir), "-i", str(source), "--prefix", str(prefixes), "--device", "cpu"])
    assert unknown.exit_code == 0 and len(unknown.stdout.splitlines()) == 3
    assert "line 1: its prefix holds characters the target vocabulary lacks" in unknown.stderr
    assert_one_line_error(runner.invoke(app, ["translate", str(model_dir), "--prefix-only"], input="w1\n"),
                          "--prefix-only needs --prefix")
    prefixes.write_text("V1\n", encoding="utf-8")
    assert_one_line_error(runner.invoke(app, ["translate", str(model_dir), "-i", str(source), "--prefix", str(prefixes)]),
                    "prefix.txt has 1 lines")
    out = tmp_path / "out.txt"
    out.write_text("keep me\n", encoding="utf-8")
    runner.invoke(app, ["translate", str(model_dir), "-i", str(source), "--prefix", str(prefixes), "-o", str(out)])
    assert out.read_text(encoding="utf-8") == "keep me\n"  # a failed run leaves the old output alone


def test_ensembles_of_a_transformer_and_an_rnn_and_their_vocabulary_check(trained, tmp_path):
    _, transformer, rnn = trained
    lines = "".join(f"{s}\n" for s in _lines(6))
    result = runner.invoke(app, ["translate", str(transformer), str(rnn), "--nbest", "2", "--device", "cpu"], input=lines)
    assert result.exit_code == 0, result.output
    assert [int(line.split(" ||| ")[0]) for line in result.output.splitlines()] == [i for i in range(6) for _ in range(2)]
    sampled = runner.invoke(app, ["translate", str(transformer), str(rnn), "--sampling", "--topk", "5", "--device", "cpu"], input=lines)
    assert sampled.exit_code == 0 and len(sampled.output.splitlines()) == 6
    other = tmp_path / "other"
    shutil.copytree(rnn, other)
    vocab = json.loads((other / "vocab.json").read_text())
    vocab["vocab"]["tgt_sha256"] = "0" * 64
    (other / "vocab.json").write_text(json.dumps(vocab))
    assert_one_line_error(runner.invoke(app, ["translate", str(transformer), str(other)], input=lines),
                    "target SentencePiece models differ")


def test_sampling_options_from_the_command_line(trained, tmp_path):
    _, model_dir, _ = trained
    lines = "".join(f"{s}\n" for s in _lines(5))
    args = ["translate", str(model_dir), "--sampling", "--topp", "0.9", "--temperature", "1.2", "--nbest", "7", "--device", "cpu"]
    first, again = runner.invoke(app, [*args, "--seed", "3"], input=lines), runner.invoke(app, [*args, "--seed", "3"], input=lines)
    assert first.exit_code == 0, first.output
    assert first.output == again.output and len(first.output.splitlines()) == 35
    assert_one_line_error(runner.invoke(app, ["translate", str(model_dir), "--topk", "3"], input=lines), "topk: only with sampling")
    assert_one_line_error(runner.invoke(app, [*args, "--topp", "1.5"], input=lines), "decode.topp")
    assert_one_line_error(runner.invoke(app, [*args, "--beam", "5"], input=lines), "beam: not with sampling")
    sampling = tmp_path / "sampling"  # a model whose config samples: --beam does not go unheeded
    shutil.copytree(model_dir, sampling)
    config = (sampling / "config.yaml").read_text()
    (sampling / "config.yaml").write_text(config.replace("sampling: false", "sampling: true"))
    for option, value in (("--beam", "3"), ("--len-penalty", "2")):
        assert_one_line_error(runner.invoke(app, ["translate", str(sampling), option, value], input=lines),
                              "the model samples", "--no-sampling")
    searched = runner.invoke(app, ["translate", str(sampling), "--no-sampling", "--beam", "3"], input=lines)
    assert searched.output == runner.invoke(app, ["translate", str(model_dir), "--beam", "3"], input=lines).output
    for option, value in [("--temperature", "nan"), ("--temperature", "1e308"), ("--seed", str(2**64)),
                          ("--beam", str(10**20)), ("--max-len-a", "1e300"), ("--max-len-b", "-5"),
                          ("--len-penalty", "nan"), ("--chunk-lines", str(10**20))]:
        assert_one_line_error(runner.invoke(app, [*args, option, value], input=lines), f"decode.{option[2:].replace('-', '_')}")
    blocked = runner.invoke(app, ["translate", str(model_dir), "--no-repeat-ngram", "1", "--device", "cpu"], input=lines)
    assert blocked.exit_code == 0 and len(blocked.output.splitlines()) == 5, blocked.output
    for line in blocked.output.splitlines():
        assert len(set(line.split())) == len(line.split())


def test_training_keeps_the_last_and_the_best_checkpoints(trained):
    _, model_dir, _ = trained
    assert [c.step for c in update_checkpoints(model_dir)][-2:] == [90, 120]  # the last two validations


def _fake_checkpoint(save_dir: Path, step: int, score: float) -> None:
    directory = save_dir / update_checkpoint_name(step)
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(b"")
    CheckpointInfo(TrainState(step=step, last_valid={"bleu": score})).write(directory)


def test_pruning_keeps_exactly_the_last_and_the_best(tmp_path):
    scores = {100: 5.0, 200: 9.0, 300: 7.0, 400: 8.0, 500: 6.0, 600: 4.0}
    for step, score in scores.items():
        _fake_checkpoint(tmp_path, step, score)
    prune_update_checkpoints(tmp_path, keep_last=2, keep_best=2)
    assert [c.step for c in update_checkpoints(tmp_path)] == [200, 400, 500, 600]
    prune_update_checkpoints(tmp_path, keep_last=1, keep_best=0)
    assert [c.step for c in update_checkpoints(tmp_path)] == [600]
    # A checkpoint whose pruning was cut short (info.json gone) is no checkpoint, and goes next time.
    _fake_checkpoint(tmp_path, 700, 1.0)
    (tmp_path / update_checkpoint_name(700) / "info.json").unlink()
    assert [c.step for c in update_checkpoints(tmp_path)] == [600]
    prune_update_checkpoints(tmp_path, keep_last=1, keep_best=0)
    assert not (tmp_path / update_checkpoint_name(700)).exists()


def test_overwrite_removes_the_old_runs_kept_checkpoints(trained, tmp_path):
    root, model_dir, _ = trained
    run = tmp_path / "run"
    shutil.copytree(model_dir, run)
    _fake_checkpoint(run, 9_999_000, 99.0)  # a late, excellent checkpoint of the old run
    train_tiny(root / "data", run, TINY_TRANSFORMER, max_steps=60, keep_last=2, keep_best=2, overwrite=True)
    assert [c.step for c in update_checkpoints(run)] == [30, 60]


def test_average_of_copies_is_the_checkpoint_and_shapes_must_agree(tmp_path):
    tensors = {"a.weight": torch.randn(3, 4), "b.bias": torch.randn(4).to(torch.bfloat16)}
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.safetensors")
        save_file(tensors, str(paths[-1]))
    averaged = average_weights(paths)
    assert all(torch.equal(averaged[name], tensors[name]) for name in tensors)
    save_file({"a.weight": torch.randn(3, 5), "b.bias": torch.randn(4)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=r"a.weight has shape \(3, 4\) in one and \(3, 5\)"):
        average_weights([paths[0], tmp_path / "other.safetensors"])


def test_nmt_average_writes_a_model_dir_that_translates(trained, tmp_path):
    _, model_dir, _ = trained
    out = tmp_path / "averaged"
    result = runner.invoke(app, ["average", str(model_dir), "--last", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    kept = update_checkpoints(model_dir)[-2:]
    expected = average_weights([c.path / "model.safetensors" for c in kept])
    written = load_file(str(out / "best" / "model.safetensors"))
    assert all(torch.allclose(written[name], expected[name]) for name in written)
    translated = runner.invoke(app, ["translate", str(out), "--device", "cpu"], input="w1 w2\n")
    assert translated.exit_code == 0 and len(translated.output.splitlines()) == 1
    # the average is best/ alone: asked for last/, it says so rather than translating with best/
    assert_one_line_error(runner.invoke(app, ["translate", str(out), "--checkpoint", "last"], input="w1 w2\n"),
                          "holds the weights of best/ only")
    assert runner.invoke(app, ["average", str(model_dir), "--best", "2", "--out", str(tmp_path / "best2")]).exit_code == 0
    found = update_checkpoints(model_dir)  # --best 1 of these is the one of the highest dev score
    assert len(found) >= 2 and len({c.score for c in found}) == len(found)
    assert runner.invoke(app, ["average", str(model_dir), "--best", "1", "--out", str(tmp_path / "best1")]).exit_code == 0
    expected = load_file(str(max(found, key=lambda c: c.score).path / "model.safetensors"))
    written = load_file(str(tmp_path / "best1" / "best" / "model.safetensors"))
    assert all(torch.equal(written[name], expected[name]) for name in written)
    assert_one_line_error(runner.invoke(app, ["average", str(model_dir), "--last", "2", "--out", str(out)]), "not empty")
    assert_one_line_error(runner.invoke(app, ["average", str(model_dir), "--last", "9", "--out", str(tmp_path / "x")]),
                    "fewer than 9", "keep_last=9")
    assert_one_line_error(runner.invoke(app, ["average", str(model_dir), "--out", str(tmp_path / "y")]), "--last N or --best N")
    (tmp_path / "afile").write_text("mine")
    assert_one_line_error(runner.invoke(app, ["average", str(model_dir), "--last", "2", "--out", str(tmp_path / "afile" / "sub")]),
                          "could not write")
    # keeping enough, but validated fewer times so far: the advice is not to keep more
    few = tmp_path / "few"
    shutil.copytree(model_dir, few)
    for checkpoint in update_checkpoints(few)[:-1]:
        shutil.rmtree(checkpoint.path)
    assert_one_line_error(runner.invoke(app, ["average", str(few), "--best", "2", "--out", str(tmp_path / "w")]),
                          "holds 1 kept checkpoint(s)", "ask for fewer, or train longer")
    # The latest kept checkpoints are not the last validations when one between was pruned.
    pruned = tmp_path / "pruned"
    shutil.copytree(model_dir, pruned)
    shutil.rmtree(pruned / update_checkpoint_name(kept[-1].step))
    assert_one_line_error(runner.invoke(app, ["average", str(pruned), "--last", "1", "--out", str(tmp_path / "z")]),
                          f"step {kept[-1].step} was pruned")


def test_bench_scale_measures_translation_memory_and_stream_latency(trained, tmp_path, monkeypatch):
    import subprocess

    from nmt.bench_scale import ScaleBenchConfig, run_scale_bench

    root, model_dir, _ = trained
    launched, popen = [], subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda command, **options: launched.append(command) or popen(command, **options))
    report = run_scale_bench(ScaleBenchConfig(data=root / "c", src="xx", tgt="yy", pairs=400, ratio=4, translate=model_dir,
                                              beam=2, stream_lines=3, out=tmp_path / "report.json"))
    translations = [command for command in launched if "translate" in command]
    assert len(translations) == 3 and all(command[command.index("--beam") + 1] == "2" for command in translations)
    assert report["large"]["output_lines"] == 400 and report["small"]["output_lines"] == 100
    assert report["large"]["translate_peak_rss_bytes"] > 0 and report["stream_latency"]["lines"] == 3
    assert json.loads((tmp_path / "report.json").read_text())["kind"] == "translate"


def test_outputs_that_cannot_be_written_and_inputs_that_are_folders_or_pipes(trained, tmp_path):
    import os
    import threading

    _, model_dir, _ = trained
    source = tmp_path / "in.txt"
    source.write_text("".join(line + "\n" for line in [*_lines(3), ""]), encoding="utf-8")
    translate = ["translate", str(model_dir), "-i", str(source)]
    assert_one_line_error(runner.invoke(app, [*translate, "-o", str(tmp_path)]), "not a folder")
    assert_one_line_error(runner.invoke(app, [*translate, "-o", "/proc/nmt-output.txt"]), "cannot write")
    assert_one_line_error(runner.invoke(app, ["translate", str(model_dir), "-i", str(tmp_path)]), "is a folder")
    expected = translate_file(model_dir, source, tmp_path / "file.txt")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(source.read_text(encoding="utf-8"), encoding="utf-8"))
    writer.start()
    assert translate_file(model_dir, fifo, tmp_path / "piped.txt") == expected == 4  # a pipe reads as a file
    writer.join()
    assert (tmp_path / "piped.txt").read_text() == (tmp_path / "file.txt").read_text()
    # `-o FILE < FILE`: the file read through stdin is the input too
    victim = tmp_path / "victim.txt"
    victim.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    with open(victim, "rb") as stdin:
        process = subprocess.run([sys.executable, "-m", "cli", "translate", str(model_dir), "-o", str(victim)],
                                 stdin=stdin, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert process.returncode == 1 and "it is the input" in process.stderr and "Traceback" not in process.stderr
    assert victim.read_text(encoding="utf-8") == source.read_text(encoding="utf-8")
    # `-i FILE >> FILE` (or `< FILE >> FILE`): the input would grow as it is read, never ending
    for stdin_is_input in (False, True):
        with open(victim, "rb") as stdin, open(victim, "ab") as stdout:
            args = [] if stdin_is_input else ["-i", str(victim)]
            process = subprocess.run([sys.executable, "-m", "cli", "translate", str(model_dir), *args], stdin=stdin,
                                     stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120)
        assert process.returncode == 1 and "it is the input" in process.stderr and "Traceback" not in process.stderr
        assert victim.read_text(encoding="utf-8") == source.read_text(encoding="utf-8")
    # an output named .gz is gzip-compressed, as an input of that name is read
    assert runner.invoke(app, [*translate, "-o", str(tmp_path / "out.gz")]).exit_code == 0
    assert gzip.decompress((tmp_path / "out.gz").read_bytes()).decode() == (tmp_path / "file.txt").read_text()
    scored = runner.invoke(app, ["evaluate", "--hyp", str(tmp_path / "out.gz"), "--ref", str(tmp_path / "file.txt")])
    assert scored.exit_code == 0 and "chrF2 = 100.00" in scored.output, scored.output
    nbest = runner.invoke(app, [*translate, "--beam", "2", "--nbest", "2"]).output.splitlines()
    assert nbest[-1] == "3 |||  ||| 0.0000" and all(len(row.split(" ||| ")) == 3 for row in nbest)


def test_attention_never_writes_over_the_users_files(trained, tmp_path):
    _, model_dir, _ = trained
    source = tmp_path / "in.txt"
    source.write_text("".join(line + "\n" for line in _lines(3)), encoding="utf-8")
    translate = ["translate", str(model_dir), "-i", str(source)]
    (tmp_path / "afile").write_text("mine")
    assert_one_line_error(runner.invoke(app, [*translate, "--attention", str(tmp_path / "afile")]), "is a file")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert_one_line_error(runner.invoke(app, [*translate, "--attention", str(mine)]), "holds files", "notes.txt")
    maps = tmp_path / "maps"
    maps.mkdir()
    (maps / ".DS_Store").write_text("a file browser's")  # hidden files are no one's translations
    assert_one_line_error(runner.invoke(app, [*translate, "--attention", str(maps), "-o", str(maps / "alignments.txt")]),
                          "a file --attention writes")
    assert runner.invoke(app, [*translate, "--attention", str(maps), "-o", str(maps / "out.txt")]).exit_code == 0
    assert sorted(p.name for p in maps.iterdir()) == [".DS_Store", "alignments.txt",
                                                      *[f"line-00000{i}.png" for i in (1, 2, 3)], "out.txt"]
    # An input with the name of a file --attention writes, in its folder: refused, left as it was
    for option in ("-i", "--prefix"):
        inside = maps / ("alignments.txt" if option == "-i" else "attention.jsonl")
        inside.write_text("w1 w2\n", encoding="utf-8")
        args = ["-i", str(inside)] if option == "-i" else ["-i", str(source), "--prefix", str(inside)]
        result = runner.invoke(app, ["translate", str(model_dir), *args, "--attention", str(maps)])
        assert_one_line_error(result, f"{option} {inside} is a file --attention {maps} writes")
        assert inside.read_text(encoding="utf-8") == "w1 w2\n"
        inside.unlink()
    (maps / "alignments.txt").symlink_to(source)  # through a link, -i would be written over all the same
    assert_one_line_error(runner.invoke(app, [*translate, "--attention", str(maps)]), "is a file --attention")
    assert source.read_text(encoding="utf-8") == "".join(line + "\n" for line in _lines(3))
    (maps / "alignments.txt").unlink()
    source.write_text(_lines(1)[0] + "\n", encoding="utf-8")  # again into the same folder, with fewer lines
    assert runner.invoke(app, [*translate, "--attention", str(maps), "-o", str(maps / "out.txt")]).exit_code == 0
    assert sorted(p.name for p in maps.iterdir()) == [".DS_Store", "alignments.txt", "line-000001.png", "out.txt"]


class PreferringReservedSymbols:
    """A model whose likeliest next tokens are always [MASK], [CLS] and [SEP]."""

    def __init__(self, model):
        self.model = model

    def encode(self, src):
        return self.model.encode(src)

    def init_state(self, memory, *attention):
        return self.model.init_state(memory, *attention)

    def decode_step(self, prev, memory, state):
        from nmt.tokenizer import CLS, MASK, SEP

        log_probs, state = self.model.decode_step(prev, memory, state)
        log_probs = log_probs.clone()
        log_probs[:, [MASK, CLS, SEP]] = 0.0
        return log_probs, state


def test_reserved_symbols_never_appear_in_a_translation(trained):
    import dataclasses

    from nmt.tokenizer import CLS, MASK, SEP
    from nmt.translate import load_translator

    _, transformer, _ = trained
    translator = load_translator([transformer], device="cpu")
    translator = dataclasses.replace(translator, model=PreferringReservedSymbols(translator.model))
    lines = [src for src, _ in toy_pairs(6, seed=9)]
    for options in ({"beam": 1}, {"beam": 3, "nbest": 3}, {"sampling": True, "nbest": 3}):
        result = translator.translate(lines, decode=dataclasses.replace(translator.decode, **options))
        assert all(not {MASK, CLS, SEP} & set(h.tokens) for nbest in result.hypotheses for h in nbest), options
        assert all(text and "[" not in text for texts in result.texts for text in texts), options


def test_a_model_trained_with_settings_since_refused_still_translates(trained, tmp_path):
    import yaml

    _, transformer, _ = trained
    model = tmp_path / "model"
    shutil.copytree(transformer, model)
    config = yaml.safe_load((model / "config.yaml").read_text())
    config["train"]["clip_norm"] = -1.0  # "off" to the version that trained it; refused in a new config
    (model / "config.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(app, ["translate", str(model), "--device", "cpu"], input="w1 w2\n")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 1, result.output


def test_int8_translates_in_fp32_and_refuses_half_precision(trained):
    """Dynamic int8 products take fp32 activations: with bf16 or fp16 asked for (option or
    config), a one-line refusal when loading, not a traceback at the first line (or a 500 from serve)."""
    _, model_dir, rnn_dir = trained
    for model in (model_dir, rnn_dir):
        result = runner.invoke(app, ["translate", str(model), "--device", "cpu", "--int8"], input="w1 w2\n")
        assert result.exit_code == 0 and len(result.output.splitlines()) == 1, result.output
        for precision in ("bf16", "fp16"):
            refused = runner.invoke(app, ["translate", str(model), "--device", "cpu", "--int8", "--precision", precision],
                                    input="w1 w2\n")
            assert_one_line_error(refused, f"int8 decoding computes in fp32, not {precision}")


def test_average_refuses_a_file_that_lacks_a_tensor(tmp_path):
    from safetensors.torch import save_file

    from nmt.average import average_weights
    save_file({"a": torch.ones(2), "b": torch.ones(2)}, str(tmp_path / "0.safetensors"))
    save_file({"a": torch.ones(2)}, str(tmp_path / "1.safetensors"))
    with pytest.raises(CheckpointError, match="has the tensor b"):
        average_weights([tmp_path / "0.safetensors", tmp_path / "1.safetensors"])


def test_choose_checkpoints_takes_the_newest_or_the_best_in_step_order(tmp_path, monkeypatch):
    import nmt.average as average
    from nmt.checkpoint import UpdateCheckpoint
    from nmt.config import Config
    found = [UpdateCheckpoint(2, tmp_path / "s2", 0.1), UpdateCheckpoint(4, tmp_path / "s4", 0.2),
             UpdateCheckpoint(6, tmp_path / "s6", 0.3), UpdateCheckpoint(8, tmp_path / "s8", 0.0)]
    config = Config()
    config.train.keep_last = config.train.keep_best = 4
    monkeypatch.setattr(average, "read_config", lambda d: config)
    monkeypatch.setattr(average, "update_checkpoints", lambda d: list(found))
    assert [c.step for c in average.choose_checkpoints(tmp_path, last=2)] == [6, 8]
    assert [c.step for c in average.choose_checkpoints(tmp_path, best=2)] == [4, 6]
    for last, best in ((-1, 2), (2, -1), (-3, 1), (0, 0), (1, 1)):  # one of the two, and a count
        with pytest.raises(ConfigError, match="give either --last N or --best N"):
            average.choose_checkpoints(tmp_path, last=last, best=best)
    config.train.keep_last = 2  # a third of the latest is kept only as one of the best
    with pytest.raises(CheckpointError, match=r"keeps 2 checkpoint\(s\) by train.keep_last"):
        average.choose_checkpoints(tmp_path, last=3)
    # equal scores: the older one, as keep_best keeps
    found[:] = [UpdateCheckpoint(2, tmp_path / "s2", 5.0), UpdateCheckpoint(4, tmp_path / "s4", 7.0),
                UpdateCheckpoint(6, tmp_path / "s6", 7.0)]
    assert [c.step for c in average.choose_checkpoints(tmp_path, best=1)] == [4]


def test_average_last_refuses_when_a_validation_between_was_pruned(tmp_path, monkeypatch):
    import nmt.average as average
    from nmt.checkpoint import UpdateCheckpoint
    from nmt.config import Config

    config = Config()
    config.train.keep_last = 2
    monkeypatch.setattr(average, "read_config", lambda d: config)
    monkeypatch.setattr(average, "update_checkpoints", lambda d: [UpdateCheckpoint(s, tmp_path / f"s{s}", 1.0) for s in (2, 4, 8)])
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps({"type": "valid", "step": s, "loss": 1.0, "bleu": 1.0}) + "\n"
                                                      for s in (2, 4, 6, 8)))
    with pytest.raises(CheckpointError, match="step 6 was pruned"):
        average.choose_checkpoints(tmp_path, last=2)


def test_average_refuses_a_damaged_checkpoint(trained, tmp_path):
    """Safetensors files carry no checksum: the one in info.json is compared before averaging."""
    _, model_dir, _ = trained
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    weights = update_checkpoints(copy)[-1].path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = CliRunner().invoke(app, ["average", str(copy), "--last", "2", "--out", str(tmp_path / "avg")])
    assert_one_line_error(result, "checksum does not match")


def test_the_average_records_the_state_of_its_latest_checkpoint(trained, tmp_path):
    _, model_dir, _ = trained
    out = tmp_path / "avg"
    assert CliRunner().invoke(app, ["average", str(model_dir), "--best", "2", "--out", str(out)]).exit_code == 0
    chosen = sorted(update_checkpoints(model_dir), key=lambda c: c.score, reverse=True)[:2]
    info = CheckpointInfo.read(out / "best")
    assert info.state.step == max(c.step for c in chosen)
    assert info.averaged == [str(c.path) for c in sorted(chosen, key=lambda c: c.step)]


def test_average_last_ignores_the_validation_at_a_stop_between_two(tiny_trained, tmp_path):
    """The validation at a stop between two scheduled ones keeps no checkpoint: --last N counts
    the scheduled ones."""
    from nmt.average import average_checkpoints
    from nmt.train_log import read_train_log

    _, model = tiny_trained
    _, valid = read_train_log(model)
    assert [r["step"] for r in valid] == [30, 60, 90, 100] and valid[-1].get("scheduled") is False
    chosen = average_checkpoints(model, tmp_path / "averaged", last=2)
    assert [c.step for c in chosen] == [60, 90]


def test_an_input_reached_through_a_link_to_a_file_attention_writes_is_refused(tmp_path):
    """The files --attention writes are compared with the inputs where they lead: an -i given
    as a link to the folder's alignments.txt would be written over all the same."""
    from nmt.alignment import check_attention_dir
    from nmt.errors import DataError

    maps = tmp_path / "maps"
    maps.mkdir()
    (maps / "alignments.txt").write_text("w1 w2\n", encoding="utf-8")
    link = tmp_path / "input.txt"
    link.symlink_to(maps / "alignments.txt")
    with pytest.raises(DataError, match="is a file --attention"):
        check_attention_dir(maps, None, [("-i", link)])
    with pytest.raises(DataError, match="is a file --attention"):  # another spelling of the same file
        check_attention_dir(maps, None, [("-i", maps / "sub" / ".." / "alignments.txt")])
    assert (maps / "alignments.txt").read_text(encoding="utf-8") == "w1 w2\n"
