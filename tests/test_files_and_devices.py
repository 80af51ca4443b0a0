"""Atomic writes and the guards on outputs, versioned files read back, and the device choice."""

import json
import os
import stat
import time
from pathlib import Path

import pytest
import torch

from nmt.atomic import check_replaceable, complete_dir, open_text_atomic
from nmt.devices import resolve_device, resolve_precision
from nmt.errors import ConfigError, DataError
from nmt.files import CheckpointInfo, _sides, check_format_version
from nmt.normalize import Normalization
from nmt.paths import check_output_apart, nested

# --- nmt/atomic.py ---------------------------------------------------------------------------

def test_overwrite_refuses_a_folder_without_the_marker(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep")
    with pytest.raises(OSError, match="no vocab.json"):
        check_replaceable(target, True, "vocab.json", "a model")
    (target / "vocab.json").write_text("{}")
    check_replaceable(target, True, "vocab.json", "a model")


def test_a_directory_replaced_by_a_process_killed_between_its_renames_keeps_the_old_copy(tmp_path, monkeypatch):
    from nmt import atomic

    target, new = tmp_path / "last", tmp_path / ".last.tmp-1"
    for folder, text in ((target, "old"), (new, "new")):
        folder.mkdir()
        (folder / "weights").write_text(text)
    rename = os.replace

    def killed_before_the_new_copy_is_in_place(source, destination):
        if str(source) == str(new):
            raise KeyboardInterrupt
        return rename(source, destination)

    monkeypatch.setattr(atomic.os, "replace", killed_before_the_new_copy_is_in_place)
    with pytest.raises(KeyboardInterrupt):
        atomic.replace_dir(new, target)
    monkeypatch.setattr(atomic.os, "replace", rename)
    assert (complete_dir(target) / "weights").read_text() == "old"


@pytest.mark.parametrize("umask, mode", [(0o077, 0o600), (0o002, 0o664), (0o022, 0o644)])
def test_written_files_take_the_mode_the_umask_gives(umask, mode):
    from nmt.atomic import file_mode

    previous = os.umask(umask)
    try:
        assert file_mode() == mode
    finally:
        os.umask(previous)


def test_a_process_of_another_user_counts_as_running(monkeypatch):
    """Its temporary files are not leftovers to remove: signalling it is refused, not failed."""
    from nmt import atomic

    def refused(pid, signal):
        raise PermissionError

    monkeypatch.setattr(atomic.os, "kill", refused)
    assert atomic.process_running(1)


def test_nested_holds_both_ways(tmp_path):
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    assert nested(tmp_path / "a", inner) and nested(inner, tmp_path / "a")
    assert not nested(tmp_path / "a", tmp_path / "c")


def test_complete_dir_picks_the_newest_moved_aside_copy(tmp_path):
    old, new = tmp_path / ".m.old-1", tmp_path / ".m.old-2"
    old.mkdir()
    new.mkdir()
    now = time.time()
    os.utime(old, (now - 100, now - 100))
    os.utime(new, (now, now))
    assert complete_dir(tmp_path / "m") == new


def test_output_that_is_the_input_under_another_name_is_refused(tmp_path):
    given = tmp_path / "in.txt"
    given.write_text("hello\n")
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError):
        check_output_apart(tmp_path / "sub" / ".." / "in.txt", [given], [])
    os.link(given, tmp_path / "hard.txt")
    with pytest.raises(DataError):
        check_output_apart(tmp_path / "hard.txt", [given], [])


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with open_text_atomic(target) as f:
            f.write("half")
            raise RuntimeError("stop")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    assert target.read_text() == "old\n"


def test_an_atomic_write_keeps_the_files_permissions_and_takes_the_longest_names(tmp_path):
    private = tmp_path / "private.txt"
    private.write_text("old\n")
    private.chmod(0o600)
    with open_text_atomic(private) as f:
        f.write("new\n")
    assert private.read_text() == "new\n" and stat.S_IMODE(private.stat().st_mode) == 0o600
    for name in ("a" * 255, "é" * 127):  # 255 and 254 bytes: the temporary name beside it is cut short
        with open_text_atomic(tmp_path / name) as f:
            f.write("x\n")
        assert (tmp_path / name).read_text() == "x\n"


# --- nmt/files.py ----------------------------------------------------------------------------

def test_format_version_one_above_is_refused():
    with pytest.raises(DataError, match="newer"):
        check_format_version({"format_version": 2}, Path("x.json"), 1, DataError)
    check_format_version({"format_version": 1}, Path("x.json"), 1, DataError)


def test_a_boolean_format_version_is_damaged():
    with pytest.raises(DataError, match="damaged"):
        check_format_version({"format_version": True}, Path("x.json"), 1, DataError)


def test_a_record_without_normalization_means_nfc():
    sides = _sides(None)
    assert sides["src"] == sides["tgt"] == Normalization.from_saved("NFC").as_dict()


def test_checkpoint_info_reads_best_bleu_of_older_files(tmp_path):
    (tmp_path / "info.json").write_text(json.dumps({"step": 10, "best_bleu": 12.5, "best_step": 8}))
    info = CheckpointInfo.read(tmp_path)
    assert info.state.best_score == 12.5 and info.state.best_step == 8


# --- nmt/devices.py --------------------------------------------------------------------------

def test_auto_precision_is_fp32_on_a_cpu():
    assert resolve_precision("auto", torch.device("cpu")) == torch.float32


def test_a_gpu_index_equal_to_the_count_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="1 GPUs"):
        resolve_device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda:0")


def test_a_device_other_than_cpu_or_cuda_is_refused():
    with pytest.raises(ConfigError, match="unsupported"):
        resolve_device("meta")


def test_a_killed_writers_temporary_files_go_at_the_next_write_and_a_running_ones_stay(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f".out.txt.tmp-{int(dead.stdout)}"  # a process that is gone
    left.write_text("half")
    (tmp_path / ".out.txt.tmp-1").write_text("init's, running")  # PID 1 always runs
    (tmp_path / ".out.txt.tmp-folder").mkdir()  # not a PID: not ours to judge
    with open_text_atomic(tmp_path / "out.txt") as f:
        f.write("whole\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.txt.tmp-1", ".out.txt.tmp-folder", "out.txt"]


def test_a_manifest_json_lacking_a_field_every_prepare_wrote_is_not_nmts(tmp_path):
    """Manifest.written_by_nmt asks for every field that all versions of prepare wrote: another
    program's manifest.json that shares some of their names is not taken for a data dir's."""
    from nmt.files import Manifest

    path = tmp_path / "manifest.json"
    written = {"src_lang": "de", "tgt_lang": "en", "vocab": {}, "counts": {}, "kind": "parallel"}
    path.write_text(json.dumps(written))
    assert Manifest.written_by_nmt(path)
    for key in ("src_lang", "tgt_lang", "vocab", "counts"):
        path.write_text(json.dumps({k: v for k, v in written.items() if k != key}))
        assert not Manifest.written_by_nmt(path), key
    for text in ('["src_lang", "tgt_lang", "vocab", "counts"]', "{not json"):
        path.write_text(text)
        assert not Manifest.written_by_nmt(path)


def test_a_leftover_temporary_of_this_process_goes_at_its_next_write(tmp_path):
    """What an earlier, failed write of this same process left under the temporary name (a
    folder, say) is removed before the name is used again."""
    from nmt.atomic import open_text_atomic

    left = tmp_path / f".out.txt.tmp-{os.getpid()}"
    left.mkdir()
    (left / "part").write_text("half")
    with open_text_atomic(tmp_path / "out.txt") as f:
        f.write("whole\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    assert (tmp_path / "out.txt").read_text() == "whole\n"


def test_same_place_compares_paths_that_do_not_exist_in_their_absolute_form(tmp_path, monkeypatch):
    """Where a path does not exist, two spellings of one absolute path are one place: a
    relative one, one through '..'."""
    from nmt.paths import same_place

    monkeypatch.chdir(tmp_path)
    assert same_place("model", tmp_path / "model")
    assert same_place("new/../model", tmp_path / "model")
    assert not same_place("model", tmp_path / "other")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert same_place("link", tmp_path / "real")  # both exist: the same folder


def test_an_output_inside_a_folder_given_by_another_spelling_is_refused(tmp_path, monkeypatch):
    """A folder the command reads is compared in its resolved form: given through a link or as a
    relative path, an output inside it is still refused."""
    from nmt.errors import DataError
    from nmt.paths import check_output_apart

    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "link").symlink_to(model)
    with pytest.raises(DataError, match="inside"):
        check_output_apart(model / "out.txt", [], [tmp_path / "link"])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="inside"):
        check_output_apart(model / "out.txt", [], [Path("model")])
    check_output_apart(tmp_path / "out.txt", [], [Path("model")])  # beside it: fine


def test_a_folder_without_a_training_config_is_the_models_own_as_a_whole(tmp_path):
    """An export directory holds no config.yaml: nothing may be written into it, while a training
    run's directory keeps only its own files from outputs (tests/test_faults.py)."""
    from nmt.checkpoint import model_dir_contents
    from nmt.errors import DataError

    export = tmp_path / "export"
    export.mkdir()
    (export / "model.bin").write_bytes(b"weights")
    assert model_dir_contents(export) == [export]
    with pytest.raises(DataError, match="inside"):
        check_output_apart(export / "test.hyp", [], model_dir_contents(export))
    with pytest.raises(DataError, match="it is .*model.bin, which this command reads"):
        check_output_apart(export / "model.bin", [], [export / "model.bin"])


# --- vocab.json and nmt_export.json read back ------------------------------------------------

def _vocab_json(**changes) -> dict:
    vocab = {"src_model": "spm.model", "tgt_model": "spm.model", "src_size": 100, "tgt_size": 100,
             "src_sha256": "a" * 64, "tgt_sha256": "a" * 64}
    return {"vocab": {**vocab, **changes.pop("vocab", {})}, "src_lang": "de", "tgt_lang": "en", **changes}


@pytest.mark.parametrize("changes", [{"vocab": {"src_size": True}}, {"train_pairs": False}, {"texts": [1, 2]},
                                     {"directions": ["de-en", None]}, {"src_lang": 3}])
def test_a_vocab_json_field_of_another_kind_is_damaged(changes, tmp_path):
    """A hand-edited file: true is not a size, nor a number a name."""
    from nmt.errors import CheckpointError
    from nmt.files import VocabInfo

    (tmp_path / "vocab.json").write_text(json.dumps(_vocab_json()))
    assert VocabInfo.read(tmp_path).vocab.src_size == 100
    (tmp_path / "vocab.json").write_text(json.dumps(_vocab_json(**changes)))
    with pytest.raises(CheckpointError, match="vocab.json is damaged"):
        VocabInfo.read(tmp_path)


def test_packed_pieces_must_cover_the_whole_vocabulary():
    import numpy as np

    from nmt.errors import CheckpointError
    from nmt.files import pack_pieces, unpack_pieces

    mask = np.arange(16) % 3 == 0
    assert (unpack_pieces(pack_pieces(mask), 16) == mask).all() and (unpack_pieces(pack_pieces(mask), 10) == mask[:10]).all()
    with pytest.raises(CheckpointError, match="do not cover the vocabulary"):
        unpack_pieces(pack_pieces(mask), 17)


def test_an_ensemble_names_the_first_side_whose_sentencepiece_models_differ():
    from nmt.ensemble import _first_difference
    from nmt.files import VocabInfo

    def info(**vocab):
        return VocabInfo._from_json(_vocab_json(vocab=vocab), None)

    assert _first_difference(info(), info()) == ""
    assert "target SentencePiece models differ" in _first_difference(info(), info(tgt_sha256="b" * 64))
    assert "source SentencePiece models differ" in _first_difference(info(), info(src_sha256="b" * 64, tgt_sha256="b" * 64))
    assert "target vocabularies differ in size (100 and 120 pieces)" in _first_difference(info(), info(tgt_size=120))


def test_an_export_record_gives_each_side_its_own_normalization_and_needs_both_sides_named(tmp_path):
    from nmt.errors import CheckpointError
    from nmt.files import ExportRecord

    (tmp_path / "model").mkdir()
    record = ExportRecord(format="ctranslate2", languages={"source": "de", "target": "en"},
                          sentencepiece={"source": "a", "target": "b"},
                          normalization={"src": Normalization("NFKC").as_dict(), "tgt": Normalization("NFD").as_dict()},
                          decode={}, model={}, quantization=None, checkpoint="best", step=1, max_positions=8, attention="")
    record.write(tmp_path / "model")
    read = ExportRecord.read(tmp_path / "model")
    assert read.source_normalization() == Normalization("NFKC") and read.target_normalization() == Normalization("NFD")
    for field_name in ("languages", "sentencepiece"):
        damaged = json.loads((tmp_path / "model" / ExportRecord.NAME).read_text())
        del damaged[field_name]["target"]
        (tmp_path / "model" / ExportRecord.NAME).write_text(json.dumps(damaged))
        with pytest.raises(CheckpointError, match="is damaged"):
            ExportRecord.read(tmp_path / "model")
