"""Options each command passes on, atomic writes, versioned files and device choice."""

import json
import os
import time
from pathlib import Path

import pytest
import torch
from nmt_cli.main import app
from typer.testing import CliRunner

runner = CliRunner()


ROOT = Path(__file__).resolve().parents[1]


class Called(Exception):
    def __init__(self, *args, **kwargs):
        super().__init__("called")
        self.positional, self.keywords = args, kwargs


def _catch(monkeypatch, module, name: str) -> None:
    def called(*args, **kwargs):
        raise Called(*args, **kwargs)

    monkeypatch.setattr(module, name, called)


def _call(args: list[str]) -> Called:
    result = runner.invoke(app, args)
    assert isinstance(result.exception, Called), result.output
    return result.exception


# --- cli/main.py -----------------------------------------------------------------------------

def test_train_passes_device_data_init_and_resume(monkeypatch):
    import nmt.train

    _catch(monkeypatch, nmt.train, "train")
    call = _call(["train", str(ROOT / "recipes/multi30k/transformer-cpu.yaml"), "--data", "dd", "--out", "o",
                  "--device", "cpu", "--init", "pre", "--resume"])
    settings = call.positional[0]
    assert settings.train.device == "cpu"
    assert settings.data_dir == "dd"
    assert settings.train.init == "pre"
    assert call.keywords["resume"] is True


def test_pretrain_passes_data_text_and_vocab(monkeypatch):
    import nmt.pretrain

    _catch(monkeypatch, nmt.pretrain, "pretrain")
    call = _call(["pretrain", str(ROOT / "recipes/multi30k-lowres/pretrain-cpu.yaml"), "--data", "mono",
                  "--device", "cpu", "--resume"])
    assert call.keywords["data"] == Path("mono") and call.keywords["resume"] is True
    assert call.positional[0].train.device == "cpu"
    call = _call(["pretrain", str(ROOT / "recipes/multi30k-lowres/pretrain-cpu.yaml"), "--text", "a.de",
                  "--vocab", "v.model"])
    assert call.positional[1:3] == ([Path("a.de")], Path("v.model"))


def test_fill_mask_passes_checkpoint_and_device(monkeypatch):
    import nmt.pretrain

    _catch(monkeypatch, nmt.pretrain, "load_masked_lm")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    call = _call(["fill-mask", "m", "a [MASK] b", "--checkpoint", "last", "--device", "cpu", "--top-k", "2"])
    assert call.positional == (Path("m"), torch.device("cpu"), "last")


def test_translate_passes_sampling_precision_stream_and_engine(monkeypatch):
    import nmt.translate

    _catch(monkeypatch, nmt.translate, "translate_file")
    call = _call(["translate", "m", "--sampling", "--topk", "5", "--topp", "0.9", "--temperature", "0.7",
                  "--seed", "42", "--precision", "bf16", "--stream", "--engine", "ctranslate2",
                  "--prefix", "p.txt", "--prefix-only"])
    options = call.positional[3]
    assert {k: options[k] for k in ("sampling", "topk", "topp", "temperature", "seed", "precision", "prefix_only")} == {
        "sampling": True, "topk": 5, "topp": 0.9, "temperature": 0.7, "seed": 42, "precision": "bf16", "prefix_only": True}
    assert call.keywords["stream"] is True and call.keywords["engine"] == "ctranslate2"


def test_translate_passes_attention_options(monkeypatch, tmp_path):
    import nmt.translate

    _catch(monkeypatch, nmt.translate, "translate_file")
    call = _call(["translate", "m", "--attention", str(tmp_path / "att"), "--attention-lines", "4",
                  "--attention-layer", "2", "--attention-head", "3", "--attention-words", "--json"])
    att = call.keywords["attention"]
    assert (att.directory, att.pictures, att.words, att.json) == (tmp_path / "att", 4, True, True)
    assert (att.choice.layer, att.choice.head) == (2, 3)


def test_export_passes_checkpoint_quantization_and_overwrite(monkeypatch):
    import nmt.export

    _catch(monkeypatch, nmt.export, "export_model")
    call = _call(["export", "m", "--out", "e", "--quantization", "int8", "--checkpoint", "last", "--overwrite"])
    assert call.positional == (Path("m"), Path("e"), "ctranslate2", "int8", "last", True)


def test_average_passes_last_and_best_in_their_places(monkeypatch):
    import nmt.average

    _catch(monkeypatch, nmt.average, "average_checkpoints")
    call = _call(["average", "m", "--out", "a", "--last", "3"])
    assert call.positional == (Path("m"), Path("a"), 3, 0)
    call = _call(["average", "m", "--out", "a", "--best", "2"])
    assert call.positional == (Path("m"), Path("a"), 0, 2)


def test_evaluate_data_passes_pivot_hyp_dir_directions_and_off_target(monkeypatch):
    import nmt.evaluate

    _catch(monkeypatch, nmt.evaluate, "evaluate_directions")
    call = _call(["evaluate", "--data", "d", "--model", "m", "--pivot", "en", "--hyp-dir", "h", "--off-target",
                  "--directions", "de-fr", "--device", "cpu", "--metrics", "chrf"])
    assert call.positional[5:8] == (("chrf",), "cpu", "en")
    assert call.positional[3] is not None
    assert call.keywords["hyp_dir"] == Path("h") and call.keywords["off_target"] is True


def test_bench_serve_passes_every_option(monkeypatch):
    import nmt.serve.bench

    _catch(monkeypatch, nmt.serve.bench, "bench_serve")
    call = _call(["bench-serve", "m", "--src", "s.txt", "--clients", "1,4", "--lines", "9", "--beam", "2",
                  "--engine", "ctranslate2", "--device", "cpu", "--out", "r.json"])
    assert call.positional == (Path("m"), Path("s.txt"), [1, 4], 9, 2, "cpu", "ctranslate2")
    assert call.keywords["out"] == Path("r.json")


def test_bench_scale_passes_every_option(monkeypatch):
    import nmt.bench_scale

    _catch(monkeypatch, nmt.bench_scale, "run_scale_bench")
    call = _call(["bench-scale", "--data", "m30k", "--pairs", "500", "--ratio", "5", "--steps", "3", "--work-dir", "w",
                  "--out", "r.json", "--mono", "--translate", "mdl", "--beam", "2", "--src", "fr", "--tgt", "de"])
    (config,) = call.positional
    assert (config.data, config.pairs, config.ratio, config.steps, config.work_dir, config.out) == (
        Path("m30k"), 500, 5, 3, Path("w"), Path("r.json"))
    assert (config.mono, config.translate, config.beam, config.src, config.tgt) == (True, Path("mdl"), 2, "fr", "de")


# --- nmt/atomic.py ---------------------------------------------------------------------------

def test_overwrite_refuses_a_folder_without_the_marker(tmp_path):
    from nmt.atomic import check_replaceable

    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep")
    with pytest.raises(OSError, match="no vocab.json"):
        check_replaceable(target, True, "vocab.json", "a model")
    (target / "vocab.json").write_text("{}")
    check_replaceable(target, True, "vocab.json", "a model")


def test_nested_holds_both_ways(tmp_path):
    from nmt.atomic import nested

    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    assert nested(tmp_path / "a", inner) and nested(inner, tmp_path / "a")
    assert not nested(tmp_path / "a", tmp_path / "c")


def test_complete_dir_picks_the_newest_moved_aside_copy(tmp_path):
    from nmt.atomic import complete_dir

    old, new = tmp_path / ".m.old-1", tmp_path / ".m.old-2"
    old.mkdir()
    new.mkdir()
    now = time.time()
    os.utime(old, (now - 100, now - 100))
    os.utime(new, (now, now))
    assert complete_dir(tmp_path / "m") == new


def test_output_that_is_the_input_under_another_name_is_refused(tmp_path):
    from nmt.atomic import check_output_apart
    from nmt.errors import DataError

    given = tmp_path / "in.txt"
    given.write_text("hello\n")
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError):
        check_output_apart(tmp_path / "sub" / ".." / "in.txt", [given], [])
    os.link(given, tmp_path / "hard.txt")
    with pytest.raises(DataError):
        check_output_apart(tmp_path / "hard.txt", [given], [])


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path):
    from nmt.atomic import open_text_atomic

    target = tmp_path / "out.txt"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with open_text_atomic(target) as f:
            f.write("half")
            raise RuntimeError("stop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    assert target.read_text() == "old\n"


# --- nmt/files.py ----------------------------------------------------------------------------

def test_format_version_one_above_is_refused():
    from nmt.errors import DataError
    from nmt.files import check_format_version

    with pytest.raises(DataError, match="newer"):
        check_format_version({"format_version": 2}, Path("x.json"), 1, DataError)
    check_format_version({"format_version": 1}, Path("x.json"), 1, DataError)


def test_a_boolean_format_version_is_damaged():
    from nmt.errors import DataError
    from nmt.files import check_format_version

    with pytest.raises(DataError, match="damaged"):
        check_format_version({"format_version": True}, Path("x.json"), 1, DataError)


def test_a_record_without_normalization_means_nfc():
    from nmt.files import _sides
    from nmt.normalize import Normalization

    sides = _sides(None)
    assert sides["src"] == sides["tgt"] == Normalization.from_saved("NFC").as_dict()


def test_checkpoint_info_reads_best_bleu_of_older_files(tmp_path):
    from nmt.files import CheckpointInfo

    (tmp_path / "info.json").write_text(json.dumps({"step": 10, "best_bleu": 12.5, "best_step": 8}))
    info = CheckpointInfo.read(tmp_path)
    assert info.state.best_score == 12.5 and info.state.best_step == 8


# --- nmt/devices.py --------------------------------------------------------------------------

def test_auto_precision_is_fp32_on_a_cpu():
    from nmt.devices import resolve_precision

    assert resolve_precision("auto", torch.device("cpu")) == torch.float32


def test_a_gpu_index_equal_to_the_count_is_refused(monkeypatch):
    from nmt.devices import resolve_device
    from nmt.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="1 GPUs"):
        resolve_device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda:0")


def test_a_device_other_than_cpu_or_cuda_is_refused():
    from nmt.devices import resolve_device
    from nmt.errors import ConfigError

    with pytest.raises(ConfigError, match="unsupported"):
        resolve_device("meta")
