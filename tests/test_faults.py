"""Faults during training and damaged checkpoints: work is never lost, errors are one line."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import (
    TINY_TRANSFORMER,
    assert_one_line_error,
    prepare_toy_data,
    set_options,
    toy_pairs,
    train_tiny,
    write_pairs,
)
from nmt_cli.main import app
from typer.testing import CliRunner

from nmt import train as train_module
from nmt import translation_task
from nmt.atomic import written_in_place
from nmt.batches import Batch
from nmt.checkpoint import load_for_inference, read_config
from nmt.config import ModelConfig, TrainConfig, config_from_dict
from nmt.errors import CheckpointError
from nmt.files import Manifest
from nmt.models import build_model
from nmt.models.transformer import Transformer
from nmt.tokenizer import BOS, EOS, PAD
from nmt.train import TOO_MANY_SKIPPED, make_optimizer, train, training_update

TINY = TINY_TRANSFORMER


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_toy_data(tmp_path_factory.mktemp("faults"), train=60)


def _config(data_dir, save_dir, **train):
    return config_from_dict({
        "data_dir": str(data_dir), "save_dir": str(save_dir), "model": TINY,
        "train": {"batch_tokens": 120, "lr": 3e-3, "warmup_steps": 5, "valid_every": 1000, "log_every": 1, **train},
    })


def _batch():
    src = torch.tensor([[5, 6, 7, EOS], [8, 9, EOS, PAD]])
    tgt_in = torch.tensor([[BOS, 10, 11], [BOS, 12, PAD]])
    tgt_out = torch.tensor([[10, 11, EOS], [12, EOS, PAD]])
    return Batch(src, tgt_in, tgt_out, num_tgt_tokens=5, num_src_tokens=7)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_update_with_non_finite_loss_is_skipped(fused):
    model = build_model(ModelConfig(**TINY), 20, 20)
    tc = TrainConfig()
    optimizer = make_optimizer(model, tc, fused=fused)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.output.weight[10, 0] = float("nan")  # the logits of token 10 become NaN
    poisoned = {k: v.clone() for k, v in model.state_dict().items()}
    loss, skipped, _ = training_update(model, optimizer, None, [_batch()], tc, 1e-3, torch.device("cpu"), torch.float32)
    assert bool(skipped) and float(loss) == 0.0
    after = model.state_dict()
    assert all(torch.allclose(after[k], poisoned[k], rtol=0, atol=0, equal_nan=True) for k in after)
    assert all(float(s["step"]) == 0 for s in optimizer.state.values())  # AdamW's step count did not move

    model.load_state_dict(before)
    loss, skipped, _ = training_update(model, optimizer, None, [_batch()], tc, 1e-3, torch.device("cpu"), torch.float32)
    assert not bool(skipped) and float(loss) > 0
    assert not torch.equal(model.state_dict()["encoder_layers.0.ff.fc1.weight"], before["encoder_layers.0.ff.fc1.weight"])


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_update_the_loss_scaler_skips_counts_as_skipped(fused):
    # fp16's scaler skips an update whose gradients overflowed although its loss is finite: such
    # updates must count as skipped, or a diverged fp16 run would go on without ever updating.
    model = build_model(ModelConfig(**TINY), 20, 20)
    tc = TrainConfig()
    optimizer = make_optimizer(model, tc, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hook = model.output.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    loss, skipped, _ = training_update(model, optimizer, scaler, [_batch()], tc, 1e-3, torch.device("cpu"), torch.float32)
    assert bool(skipped) and torch.isfinite(loss) and float(loss) > 0
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    assert scaler.get_scale() == 512.0  # the scaler saw the overflow and lowered its scale

    hook.remove()
    loss, skipped, _ = training_update(model, optimizer, scaler, [_batch()], tc, 1e-3, torch.device("cpu"), torch.float32)
    assert not bool(skipped) and float(loss) > 0
    assert not torch.equal(model.state_dict()["encoder_layers.0.ff.fc1.weight"], before["encoder_layers.0.ff.fc1.weight"])


def test_training_skips_non_finite_losses_then_stops_when_they_persist(data_dir, tmp_path, monkeypatch):
    real_loss, calls = translation_task.token_loss, {"n": 0}

    def flaky_loss(logits, targets, smoothing):
        calls["n"] += 1
        loss = real_loss(logits, targets, smoothing)
        return loss * float("nan") if calls["n"] in (3, 4) else loss

    monkeypatch.setattr(translation_task, "token_loss", flaky_loss)
    messages = []
    result = train(_config(data_dir, tmp_path / "a", max_steps=8), progress=False, log=messages.append)
    assert result.steps == 8 and result.stop_reason == "max_steps"
    records = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r.get("skipped_updates", 0) for r in records if r["type"] == "train"}
    assert skipped[3] == skipped[4] == 1 and sum(skipped.values()) == 2
    assert all(r["loss"] == r["loss"] for r in records if "loss" in r)  # no NaN in the log
    assert any("non-finite" in m for m in messages)

    monkeypatch.setattr(translation_task, "token_loss", lambda *a: real_loss(*a) * float("nan"))
    result = train(_config(data_dir, tmp_path / "b", max_steps=50, max_skipped_updates=4), progress=False,
                   log=messages.append)
    assert result.stop_reason == TOO_MANY_SKIPPED and result.steps == 4
    records = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert all(r["loss"] is None for r in records if r["type"] == "train")  # no loss at all, not a loss of 0
    model, _, _ = load_for_inference(tmp_path / "b", "last")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_weights_made_infinite_by_a_finite_update_are_never_saved(data_dir, tmp_path):
    save_dir = tmp_path / "run"
    train(_config(data_dir, save_dir, max_steps=4, valid_every=4), progress=False)
    before = (save_dir / "last" / "model.safetensors").read_bytes()
    result = CliRunner().invoke(app, ["train", "--data", str(data_dir), "--out", str(save_dir), "--resume", "--no-progress",
                                      *[part for k, v in {**TINY, "arch": "transformer"}.items() for part in ("--set", f"model.{k}={v}")],
                                      "--set", "train.batch_tokens=120", "--set", "train.lr=1e39", "--set", "train.warmup_steps=5",
                                      "--set", "train.valid_every=1000", "--set", "train.log_every=1", "--set", "train.max_steps=8"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("error: training diverged")
    assert (save_dir / "last" / "model.safetensors").read_bytes() == before


def test_a_signal_never_saves_weights_made_infinite(data_dir, tmp_path, monkeypatch):
    save_dir = tmp_path / "run"
    train(_config(data_dir, save_dir, max_steps=4, valid_every=4), progress=False)
    before = (save_dir / "last" / "model.safetensors").read_bytes()

    class SignalledAtOnce:  # Ctrl-C arrived during the first update of the resumed run
        received = "SIGINT"

        def restore(self):
            pass

    monkeypatch.setattr(train_module, "StopSignal", SignalledAtOnce)
    with pytest.raises(Exception, match="training diverged"):
        train(_config(data_dir, save_dir, max_steps=8, valid_every=4, lr=1e39), resume=True, progress=False)
    assert (save_dir / "last" / "model.safetensors").read_bytes() == before


def test_out_of_memory_batch_is_split_then_skipped(data_dir, tmp_path, monkeypatch):
    real_forward, limit = Transformer.forward, {"rows": 4}

    def forward_with_memory_limit(self, src, tgt_in):
        if self.training and src.shape[0] > limit["rows"]:  # training batches only
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(self, src, tgt_in)

    monkeypatch.setattr(Transformer, "forward", forward_with_memory_limit)
    messages = []
    result = train(_config(data_dir, tmp_path / "a", max_steps=6, batch_tokens=60), progress=False, log=messages.append)
    assert result.steps == 6 and result.stop_reason == "max_steps"
    assert any("half-size batches" in m for m in messages)
    records = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert all(r.get("skipped_updates", 0) == 0 for r in records)

    limit["rows"] = 0  # nothing fits
    messages.clear()
    result = train(_config(data_dir, tmp_path / "b", max_steps=50, max_skipped_updates=3), progress=False,
                   log=messages.append)
    assert result.stop_reason == TOO_MANY_SKIPPED and result.steps == 3
    assert sum(m.startswith("warning: out of memory") and "skipped" in m for m in messages) == 3
    assert any(m.startswith("error: 3 updates in a row were skipped") for m in messages)


def _kill_during_a_save(process: subprocess.Popen, save_dir) -> bool:
    """SIGKILL `process` as soon as a checkpoint save has begun (its temporary copy exists);
    returns whether the kill left the save unfinished (a temporary or moved-aside copy)."""
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        names = os.listdir(save_dir) if save_dir.is_dir() else []
        if any(".tmp-" in name and name.startswith((".last", ".best")) for name in names):
            break
        time.sleep(0.0005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return any(".tmp-" in p.name or ".old-" in p.name for p in save_dir.iterdir())


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(data_dir, tmp_path):
    save_dir = tmp_path / "model"
    command = [sys.executable, "-m", "nmt_cli", "train", "--data", str(data_dir), "--out", str(save_dir),
               "--set", "model.embed_dim=32", "--set", "model.ff_dim=64", "--set", "model.heads=2",
               "--set", "train.batch_tokens=60", "--set", "train.valid_every=1", "--set",
               "train.valid_max_sentences=2", "--no-progress"]
    # The first run must leave a checkpoint to fall back on.
    subprocess.run(command + ["--set", "train.max_steps=2"], check=True, capture_output=True, timeout=300)
    inside = attempts = 0
    while inside < 3 and attempts < 20:  # checkpoints are written at every update: kill them mid-write
        attempts += 1
        process = subprocess.Popen(command + ["--resume", "--set", "train.max_steps=1000000"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        inside += _kill_during_a_save(process, save_dir)
        for which in ("best", "last"):
            model, tokenizer, config = load_for_inference(save_dir, which)
            assert model is not None
    assert inside >= 3, f"only {inside} of {attempts} kills landed inside a checkpoint save"
    resumed = subprocess.run(command + ["--set", "train.max_steps=1000000", "--set", "train.max_minutes=0.02",
                                        "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert not list(save_dir.glob(".*.old-*")) and not list(save_dir.glob(".*.tmp-*"))


def test_interrupted_replace_is_recovered(data_dir, tmp_path):
    save_dir = tmp_path / "model"
    train(_config(data_dir, save_dir, max_steps=3), progress=False)
    # The state a kill between replace_dir's two renames leaves: last/ moved aside, new copy partial.
    os.replace(save_dir / "last", save_dir / ".last.old-999")
    (save_dir / ".last.tmp-999").mkdir()
    (save_dir / ".last.tmp-999" / "model.safetensors").write_bytes(b"partial")
    model, _, _ = load_for_inference(save_dir, "last")
    assert model is not None and not (save_dir / "last").exists()  # reading changes nothing
    result = train(_config(data_dir, save_dir, max_steps=5), resume=True, progress=False)
    assert result.steps == 5 and (save_dir / "last" / "model.safetensors").is_file()
    assert not list(save_dir.glob(".last.*"))


def test_weights_that_lack_or_add_a_tensor_are_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    from nmt.checkpoint import load_weights

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2))
    save_file({k: v for k, v in model.state_dict().items() if k != "1.weight"}, tmp_path / "lacks.safetensors")
    with pytest.raises(CheckpointError, match=r"1\.weight"):
        load_weights(model, tmp_path / "lacks.safetensors")
    save_file({**model.state_dict(), "extra": torch.zeros(1)}, tmp_path / "adds.safetensors")
    with pytest.raises(CheckpointError, match="extra"):
        load_weights(model, tmp_path / "adds.safetensors")


def test_damaged_checkpoint_is_reported_in_one_line(data_dir, tmp_path):
    save_dir = tmp_path / "model"
    train(_config(data_dir, save_dir, max_steps=2), progress=False)
    weights = save_dir / "best" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a tensor: the format itself stays valid
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_for_inference(save_dir, "best")
    result = CliRunner().invoke(app, ["translate", str(save_dir), "-i", str(data_dir / "test.src.txt")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "model.safetensors is damaged" in result.output and len(result.output.strip().splitlines()) == 1

    shutil.copy(save_dir / "last" / "optimizer.safetensors", tmp_path / "optimizer.safetensors")
    (save_dir / "last" / "optimizer.safetensors").write_bytes(
        (tmp_path / "optimizer.safetensors").read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="optimizer.safetensors is damaged"):
        train(_config(data_dir, save_dir, max_steps=4), resume=True, progress=False)
    assert weights.read_bytes() == bytes(data)  # a failed resume writes nothing

    info = json.loads((save_dir / "last" / "info.json").read_text())
    (save_dir / "last" / "info.json").write_text(json.dumps({**info, "step": "ten"}))
    with pytest.raises(CheckpointError, match="info.json is damaged"):
        train(_config(data_dir, save_dir, max_steps=4), resume=True, progress=False)
    (save_dir / "config.yaml").write_text("model: [1, 2\n")
    result = CliRunner().invoke(app, ["translate", str(save_dir), "-i", str(data_dir / "test.src.txt")])
    assert_one_line_error(result, "config.yaml is damaged")


def test_prepare_into_an_unwritable_place_says_so(tmp_path):
    write_pairs(tmp_path / "c" / "train", toy_pairs(30, seed=1))
    (tmp_path / "a-file").write_text("not a directory\n")
    result = CliRunner().invoke(app, ["prepare", "--train", str(tmp_path / "c" / "train"), "--src", "xx", "--tgt",
                                      "yy", "--out", str(tmp_path / "a-file" / "data")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "cannot write the output directory" in result.output and len(result.output.strip().splitlines()) == 1
    assert (tmp_path / "a-file").read_text() == "not a directory\n"


def test_long_line_is_truncated_with_a_warning(data_dir, tmp_path):
    from nmt.translate import translate_file

    train(_config(data_dir, tmp_path / "model", max_steps=2), progress=False)
    (tmp_path / "in.txt").write_text("w1 w2 " * 200 + "\n\nw3\n", encoding="utf-8")
    warnings = []
    count = translate_file(tmp_path / "model", tmp_path / "in.txt", tmp_path / "out.txt", {"max_input_tokens": 8},
                           device="cpu", warn=warnings.append)
    assert count == 3 and len((tmp_path / "out.txt").read_text(encoding="utf-8").split("\n")) == 4
    assert warnings == ["warning: line 1 has more than 8 tokens and was truncated"]


def test_second_training_run_on_the_same_directory_is_refused(data_dir, tmp_path):
    import fcntl

    save_dir = tmp_path / "model"
    save_dir.mkdir()
    with open(save_dir / ".lock", "w") as held:  # as a running `nmt train` holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(CheckpointError, match="another training run is using"):
            train(_config(data_dir, save_dir, max_steps=2), progress=False)
    assert train(_config(data_dir, save_dir, max_steps=2), progress=False).steps == 2


def test_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from nmt import checkpoint
    from nmt.checkpoint import load_training_state

    save_dir = tmp_path / "model"
    train(_config(data_dir, save_dir, max_steps=2), progress=False)
    real_save_file = checkpoint.save_file

    def disk_full(tensors, path, *args, **kwargs):
        real_save_file(tensors, path, *args, **kwargs)
        with open(path, "r+b") as f:  # what a full disk leaves: a file cut short
            f.truncate(10)
        raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(CheckpointError) as error:
        train(_config(data_dir, save_dir, max_steps=4), resume=True, progress=False)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and str(save_dir / "last") in message
    assert "No space left on device" in message and "previous checkpoint is intact" in message
    assert not [p.name for p in save_dir.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    monkeypatch.setattr(checkpoint, "save_file", real_save_file)
    model, _, _ = load_for_inference(save_dir, "last")  # checksums verified
    info = load_training_state(save_dir, model, make_optimizer(model, TrainConfig())).info
    assert info.state.step == 2


def test_checkpoint_files_follow_the_umask(data_dir, tmp_path):
    previous = os.umask(0o022)
    try:
        train(_config(data_dir, tmp_path / "model", max_steps=2), progress=False)
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "model").rglob("*") if p.is_file() and p.name != ".lock"]
    assert {p.name for p in files} >= {"model.safetensors", "optimizer.safetensors", "info.json", "config.yaml"}
    assert {p.relative_to(tmp_path): oct(p.stat().st_mode & 0o777) for p in files} == {
        p.relative_to(tmp_path): "0o644" for p in files
    }


def test_training_never_replaces_a_folder_that_holds_no_model(data_dir, tmp_path):
    folder = tmp_path / "photos"
    (folder / "best").mkdir(parents=True)
    (folder / "best" / "photo.txt").write_text("mine")
    (folder / "checkpoints").mkdir()
    for overwrite in (False, True):
        with pytest.raises(CheckpointError, match="holds files but no model"):
            train(_config(data_dir, folder, max_steps=2), overwrite=overwrite, progress=False)
    assert (folder / "best" / "photo.txt").read_text() == "mine" and (folder / "checkpoints").is_dir()
    assert not (folder / ".lock").exists()  # a refused run leaves nothing behind
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(_config(data_dir, tmp_path / "new" / "run", max_steps=2), resume=True, progress=False)
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()  # the user's, empty: reached through a folder that does not exist
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(_config(data_dir, tmp_path / "nowhere" / ".." / "mine" / "run", max_steps=2), resume=True, progress=False)
    assert (tmp_path / "mine").is_dir() and not (tmp_path / "nowhere").exists()
    with pytest.raises(Exception, match="data dir or inside it"):
        train(_config(data_dir, data_dir / "model", max_steps=2), progress=False)
    beside = tmp_path / "run"  # a folder holding the data dir prepared for it (as pretrain --text makes)
    shutil.copytree(data_dir, beside / "data")
    assert train(_config(beside / "data", beside, max_steps=2), progress=False).steps == 2


def test_overwrite_keeps_the_model_when_the_new_run_cannot_start(data_dir, tmp_path):
    save_dir = tmp_path / "model"
    train(_config(data_dir, save_dir, max_steps=2), progress=False)
    with pytest.raises(Exception, match="cuda"):
        train(_config(data_dir, save_dir, max_steps=2, device="cuda:7"), overwrite=True, progress=False)
    assert (save_dir / "best" / "model.safetensors").is_file() and (save_dir / "last" / "model.safetensors").is_file()


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
            and not p.name.startswith(".")}


def test_overwrite_keeps_the_model_until_the_new_run_has_saved(data_dir, tmp_path, monkeypatch):
    """A run that fails after it began, before its first checkpoint, gives the model back; one
    killed there leaves it aside, and the next run into the folder puts it back; once the new
    run has saved, the old model is gone."""
    save_dir = tmp_path / "model"
    train(_config(data_dir, save_dir, max_steps=2), progress=False)
    before = _files(save_dir)

    def failing_run(self, progress):
        assert not (save_dir / "best").exists() and (save_dir / ".replaced" / "best").is_dir()  # set aside
        raise RuntimeError("out of memory, say")

    with monkeypatch.context() as patch:
        patch.setattr(train_module.Trainer, "run", failing_run)
        with pytest.raises(RuntimeError, match="out of memory"):
            train(_config(data_dir, save_dir, max_steps=3, lr=1e-3), overwrite=True, progress=False)
    assert _files(save_dir) == before and not (save_dir / ".replaced").exists()

    killed = []  # a run killed before its first checkpoint: its finally never runs
    with monkeypatch.context() as patch:
        patch.setattr(train_module.Trainer, "run", lambda self, progress: killed.append(True))
        patch.setattr(train_module, "restore_replaced", lambda save_dir: False)
        train(_config(data_dir, save_dir, max_steps=3, lr=1e-3), overwrite=True, progress=False)
    assert killed and (save_dir / ".replaced").is_dir()
    assert_one_line_error(CliRunner().invoke(app, ["translate", str(save_dir)], input="w1\n"),
                          "an --overwrite run stopped before its first checkpoint")
    result = train(_config(data_dir, save_dir, max_steps=4), resume=True, progress=False)  # puts it back, goes on
    assert result.steps == 4 and not (save_dir / ".replaced").exists()

    train(_config(data_dir, save_dir, max_steps=2), overwrite=True, progress=False)
    assert not (save_dir / ".replaced").exists() and (save_dir / "last" / "model.safetensors").is_file()


def test_a_resumed_run_records_its_settings_and_its_log_stays_readable(data_dir, tmp_path):
    from nmt.checkpoint import read_config
    from nmt.train_log import read_train_log

    save_dir = tmp_path / "model"
    train(_config(data_dir, save_dir, max_steps=4, valid_every=2), progress=False)
    with open(save_dir / "train_log.jsonl", "a", encoding="utf-8") as log:
        log.write('{"type": "train", "st')  # a run killed while writing a record
    train(_config(data_dir, save_dir, max_steps=6, valid_every=2, keep_last=2), resume=True, progress=False)
    assert read_config(save_dir).train.keep_last == 2 and read_config(save_dir).train.max_steps == 6
    steps = [r["step"] for r in read_train_log(save_dir)[1]]
    assert steps == [2, 4, 6]


def test_average_refuses_an_out_inside_the_model_or_a_file(data_dir, tmp_path):
    save_dir = tmp_path / "model"
    train(_config(data_dir, save_dir, max_steps=4, valid_every=2, keep_last=2), progress=False)
    (tmp_path / "afile").write_text("x")
    for out, message in ((save_dir / "last" / "avg", "inside it"), (tmp_path / "afile", "is a file")):
        assert_one_line_error(CliRunner().invoke(app, ["average", str(save_dir), "--last", "2", "--out", str(out)]), message)
    assert CliRunner().invoke(app, ["average", str(save_dir), "--last", "2", "--out", str(tmp_path / "avg")]).exit_code == 0
    # A link to an empty folder, or to none yet, is written through (as export and prepare do)
    (tmp_path / "empty").mkdir()
    (tmp_path / "to-empty").symlink_to(tmp_path / "empty")
    (tmp_path / "to-new").symlink_to(tmp_path / "new")
    for link in ("to-empty", "to-new"):
        result = CliRunner().invoke(app, ["average", str(save_dir), "--last", "2", "--out", str(tmp_path / link)])
        assert result.exit_code == 0, result.output
        assert (tmp_path / link).is_symlink() and (tmp_path / link / "best" / "model.safetensors").is_file()
    # an --out in folders that do not exist yet
    result = CliRunner().invoke(app, ["average", str(save_dir), "--last", "2", "--out", str(tmp_path / "a" / "b" / "avg")])
    assert result.exit_code == 0 and (tmp_path / "a" / "b" / "avg" / "best" / "model.safetensors").is_file()


def test_average_refuses_weights_unlike_the_config_and_leaves_nothing_when_it_cannot_write(data_dir, tmp_path, monkeypatch):
    import yaml

    import nmt.average

    save_dir = tmp_path / "model"
    train(_config(data_dir, save_dir, max_steps=4, valid_every=2, keep_last=2), progress=False)
    edited = tmp_path / "edited"
    shutil.copytree(save_dir, edited)
    config = yaml.safe_load((edited / "config.yaml").read_text())
    config["model"]["ff_dim"] *= 2
    (edited / "config.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["average", str(edited), "--last", "2", "--out", str(tmp_path / "avg")])
    assert_one_line_error(result, "does not match the model config")
    (tmp_path / "out").mkdir()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nmt.average, "save_checkpoint", full_disk)
    result = CliRunner().invoke(app, ["average", str(save_dir), "--last", "2", "--out", str(tmp_path / "out" / "avg")])
    assert_one_line_error(result, "could not write", "No space left on device")
    assert list((tmp_path / "out").iterdir()) == []  # no half model dir, no temporary folder


def test_a_bleu_tokenizer_that_cannot_load_is_refused_before_translating(data_dir, tmp_path, monkeypatch):
    import nmt.evaluate
    import nmt.translate

    def translated(*args, **kwargs):
        raise AssertionError("translated before the tokenizer was loaded")

    class WithoutMeCab(nmt.evaluate.BLEU):  # as sacreBLEU's tokenizer is when MeCab is not installed
        def __init__(self, *args, **kwargs):
            raise ImportError("Japanese tokenization requires extra dependencies")

    monkeypatch.setattr(nmt.evaluate, "BLEU", WithoutMeCab)
    monkeypatch.setattr(nmt.translate, "translate_file", translated)
    source = data_dir / "test.src.txt"
    result = CliRunner().invoke(app, ["evaluate", "--model", str(data_dir), "--src", str(source), "--ref", str(source),
                                      "--tokenize", "ja-mecab"])
    assert_one_line_error(result, "BLEU tokenizer 'ja-mecab' cannot be loaded")


@pytest.mark.parametrize("source", ["language", "data dir"])
def test_a_tokenizer_the_target_language_picks_is_loaded_before_translating(source, data_dir, model_dir, monkeypatch):
    """Japanese (from --lang, or a data dir's target language) picks MeCab: missing, it is
    refused before anything is translated."""
    import nmt.evaluate
    import nmt.translate

    def translated(*args, **kwargs):
        raise AssertionError("translated before the tokenizer was loaded")

    class WithoutMeCab(nmt.evaluate.BLEU):
        def __init__(self, *args, tokenize=None, **kwargs):
            if tokenize == "ja-mecab":
                raise ImportError("Japanese tokenization requires extra dependencies")
            super().__init__(*args, tokenize=tokenize, **kwargs)

    monkeypatch.setattr(nmt.evaluate, "BLEU", WithoutMeCab)
    monkeypatch.setattr(nmt.translate, "translate_file", translated)
    source_file = data_dir / "test.src.txt"
    if source == "language":
        arguments = ["--src", str(source_file), "--ref", str(source_file), "--lang", "ja"]
    else:
        by_language = nmt.evaluate.bleu_tokenizer  # the data dir's target language (yy) taken for Japanese
        monkeypatch.setattr(nmt.evaluate, "bleu_tokenizer",
                            lambda lang=None, references=None: by_language("ja" if lang == "yy" else lang, references))
        arguments = ["--data", str(data_dir)]
    result = CliRunner().invoke(app, ["evaluate", "--model", str(model_dir), *arguments])
    assert_one_line_error(result, "BLEU tokenizer 'ja-mecab' cannot be loaded")


def test_a_closed_standard_output_is_refused_where_it_is_the_output(model_dir, tmp_path):
    """Python gives a process started with its standard output closed `sys.stdout = None`, and
    printing to it then does nothing: scores or translations would be lost with exit status 0."""
    two = tmp_path / "two.txt"
    two.write_text("w1 w2\nw3\n", encoding="utf-8")
    for command, problem in ((["evaluate", "--hyp", two, "--ref", two], "nowhere to print the scores"),
                             (["translate", model_dir, "-i", two], "give -o FILE")):
        process = subprocess.run([sys.executable, "-m", "nmt_cli", *map(str, command)], preexec_fn=lambda: os.close(1),
                                 stderr=subprocess.PIPE, text=True, timeout=120)
        assert process.returncode == 1 and process.stderr.strip().splitlines() == [
            f"error: the standard output is closed: {problem}"], process.stderr


def test_evaluate_and_plot_errors_are_one_line(data_dir, tmp_path):
    runner = CliRunner()
    save_dir = tmp_path / "model"
    train(_config(data_dir, save_dir, max_steps=2), progress=False)
    empty, two = tmp_path / "empty.txt", tmp_path / "two.txt"
    empty.write_text("")
    two.write_text("a\nb\n")
    evaluate = ["evaluate", "--hyp", str(two), "--ref", str(two)]
    assert_one_line_error(runner.invoke(app, ["evaluate", "--hyp", str(empty), "--ref", str(empty)]), "nothing to score")
    assert_one_line_error(runner.invoke(app, [*evaluate, "--metrics", ","]), "no metric")
    assert_one_line_error(runner.invoke(app, [*evaluate, "--metrics", "chrf", "--tokenize", "nope"]), "unknown BLEU tokenizer")
    source = data_dir / "test.src.txt"
    assert_one_line_error(runner.invoke(app, ["evaluate", "--model", str(save_dir), "--src", str(source), "--ref", str(two)]),
                          str(source), str(two))
    import threading

    fifo = tmp_path / "src.fifo"  # a pipe is read once: translated, not counted first
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes(source.read_bytes()))
    writer.start()
    result = runner.invoke(app, ["evaluate", "--model", str(save_dir), "--src", str(fifo), "--ref",
                                 str(data_dir / "test.tgt.txt"), "--metrics", "chrf"])
    writer.join()
    assert result.exit_code == 0 and "chrF" in result.output, result.output
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(runner.invoke(app, ["evaluate", "--model", str(save_dir), "--data", str(data_dir),
                                              "--hyp-dir", str(tmp_path / "afile")]), "is a file")
    assert_one_line_error(runner.invoke(app, ["evaluate", "--model", str(save_dir), "--data", str(data_dir),
                                              "--hyp-dir", str(tmp_path / "afile" / "sub")]), "cannot write --hyp-dir")
    reference, manifest = data_dir / "test.tgt.txt", Manifest.read(data_dir)
    given, linked = reference.read_bytes(), tmp_path / "linked-hyps"
    linked.mkdir()
    (linked / f"test.{manifest.src_lang}-{manifest.tgt_lang}.hyp").symlink_to(reference)  # not written over
    assert_one_line_error(runner.invoke(app, ["evaluate", "--model", str(save_dir), "--data", str(data_dir),
                                              "--hyp-dir", str(linked)]), "inside", str(data_dir))
    assert reference.read_bytes() == given
    assert_one_line_error(runner.invoke(app, ["evaluate", "--model", str(save_dir), "--data", str(data_dir),
                                              "--hyp-dir", str(data_dir)]), "inside")
    result = runner.invoke(app, ["evaluate", "--model", str(save_dir), "--data", str(data_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert [d["zero_shot"] for d in json.loads(result.output)["directions"]] == [False]  # its own direction
    result = runner.invoke(app, ["plot", str(save_dir), "--out", str(tmp_path / "curves")])
    assert result.exit_code == 0 and (tmp_path / "curves.png").is_file() and str(tmp_path / "curves.png") in result.output
    (tmp_path / "plots").mkdir()  # an existing folder: the PNG goes into it
    result = runner.invoke(app, ["plot", str(save_dir), "--out", str(tmp_path / "plots")])
    assert result.exit_code == 0 and (tmp_path / "plots" / "training-curves.png").is_file(), result.output
    assert_one_line_error(runner.invoke(app, ["plot", str(save_dir), "--out", str(tmp_path / "afile" / "c.png")]),
                          "cannot write")


def test_a_data_dir_with_a_replaced_model_or_short_references_is_refused_before_training(data_dir, tmp_path):
    """Found when the run starts, in one line: not a traceback at the first batch (ids past the
    other model's vocabulary) or at the first validation, after updates that are then lost."""
    from nmt.errors import DataError

    swapped = tmp_path / "swapped"
    shutil.copytree(data_dir, swapped)
    other = prepare_toy_data(tmp_path / "other", train=20, vocab_size=30)  # a smaller vocabulary: ids past its end
    shutil.copy(other / "spm.joint.model", swapped / "spm.joint.model")
    with pytest.raises(DataError, match="is not the SentencePiece model the data dir was prepared with") as error:
        train(_config(swapped, tmp_path / "run1", max_steps=2), progress=False)
    assert len(str(error.value).splitlines()) == 1 and not (tmp_path / "run1").exists()

    short = tmp_path / "short"
    shutil.copytree(data_dir, short)
    references = (short / "valid.tgt.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    (short / "valid.tgt.txt").write_text("".join(references[:1]), encoding="utf-8")
    with pytest.raises(DataError, match=f"valid.tgt.txt has 1 lines for {len(references)} valid pairs"):
        train(_config(short, tmp_path / "run2", max_steps=2), progress=False)


# ---- what a command writes never destroys what it reads, or a file that is not its own -------

def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def model_dir(data_dir, tmp_path_factory):
    return train_tiny(data_dir, tmp_path_factory.mktemp("faults-model") / "model", TINY, max_steps=10)


def test_translate_writes_through_links_and_pipes_and_never_over_what_it_reads(model_dir, tmp_path):
    import stat
    import threading

    src = tmp_path / "in.xx"
    src.write_text("w1 w2\nw3\n", encoding="utf-8")
    expected = _cli("translate", model_dir, "-i", src).stdout
    assert _cli("translate", model_dir, "-i", src, "-o", "-").stdout == expected  # - is stdout
    target = tmp_path / "target.yy"
    target.write_text("old\n")
    (tmp_path / "link.yy").symlink_to(target)
    assert _cli("translate", model_dir, "-i", src, "-o", tmp_path / "link.yy").exit_code == 0
    assert (tmp_path / "link.yy").is_symlink() and target.read_text(encoding="utf-8") == expected
    pipe, read = tmp_path / "pipe", []
    os.mkfifo(pipe)
    reader = threading.Thread(target=lambda: read.append(pipe.read_text(encoding="utf-8")), daemon=True)
    reader.start()
    assert _cli("translate", model_dir, "-i", src, "-o", pipe).exit_code == 0
    reader.join(30)
    assert read == [expected] and stat.S_ISFIFO(pipe.stat().st_mode)  # written to, not replaced by a file
    with open(tmp_path / "log.txt", "a", encoding="utf-8") as log:  # as `>> log.txt -o /dev/stdout` gives it
        log.write("header\n")
        log.flush()
        assert _cli("translate", model_dir, "-i", src, "-o", f"/dev/fd/{log.fileno()}").exit_code == 0
    assert (tmp_path / "log.txt").read_text(encoding="utf-8") == "header\n" + expected
    assert written_in_place(Path("/dev/stdout")) and not written_in_place(Path("/dev/shm/model/vocab.json"))
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "x.yy")
    assert_one_line_error(_cli("translate", model_dir, "-i", src, "-o", tmp_path / "dangling"), "does not exist")
    assert_one_line_error(_cli("translate", model_dir, "-i", src, "-o", src), "is the input")
    assert src.read_text(encoding="utf-8") == "w1 w2\nw3\n"
    weights = model_dir / "best" / "model.safetensors"
    before = weights.read_bytes()
    assert_one_line_error(_cli("translate", model_dir, "-i", src, "-o", weights), "inside")
    assert weights.read_bytes() == before
    for own_file in ("config.yaml", "vocab.json", "train_log.jsonl", next(model_dir.glob("spm*.model")).name):
        before = (model_dir / own_file).read_bytes()
        assert_one_line_error(_cli("translate", model_dir, "-i", src, "-o", model_dir / own_file), "which this command reads")
        assert (model_dir / own_file).read_bytes() == before
    for _ in range(2):  # a file of the user's beside the model's own: written, and written again
        assert _cli("translate", model_dir, "-i", src, "-o", model_dir / "test.hyp").exit_code == 0
        assert (model_dir / "test.hyp").read_text(encoding="utf-8") == expected
    (model_dir / "test.hyp").unlink()


def test_prepare_never_replaces_a_folder_holding_its_own_input(data_dir, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(data_dir, out)
    write_pairs(out / "raw" / "train", toy_pairs(60, seed=1))
    result = _cli("prepare", "--train", out / "raw" / "train", "--src", "xx", "--tgt", "yy", "--valid-size", 5,
                  "--test-size", 5, "--vocab-size", 40, "--out", out, "--overwrite", "--no-progress")
    assert_one_line_error(result, "inside the output directory")
    (out / "mono.xx").write_text("w1 w2\n" * 30, encoding="utf-8")
    result = _cli("prepare", "--mono", out / "mono.xx", "--valid-size", 2, "--vocab-size", 40, "--out", out,
                  "--overwrite", "--no-progress")
    assert_one_line_error(result, "inside the output directory")
    assert (out / "raw" / "train.xx").is_file() and (out / "mono.xx").is_file()
    write_pairs(tmp_path / "corp", toy_pairs(60, seed=1))  # files corp.xx and corp.yy, then the folder corp/
    result = _cli("prepare", "--train", tmp_path / "corp", "--src", "xx", "--tgt", "yy", "--valid-size", 5,
                  "--test-size", 5, "--vocab-size", 40, "--out", tmp_path / "corp", "--no-progress")
    assert result.exit_code == 0, result.output


def test_prepare_overwrite_keeps_a_folder_put_in_the_data_dir_and_a_link_to_it(data_dir, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(data_dir, out)
    (out / "avg").mkdir()  # say, nmt average ... --out DATA/avg
    (out / "avg" / "vocab.json").write_text("{}")
    write_pairs(tmp_path / "corp", toy_pairs(60, seed=1))
    args = ("--train", tmp_path / "corp", "--src", "xx", "--tgt", "yy", "--valid-size", 5, "--test-size", 5,
            "--vocab-size", 40, "--overwrite", "--no-progress")
    assert_one_line_error(_cli("prepare", *args, "--out", out), "holds the folder avg")
    assert (out / "avg" / "vocab.json").is_file()
    shutil.rmtree(out / "avg")
    (tmp_path / "link").symlink_to(out)
    result = _cli("prepare", *args, "--out", tmp_path / "link")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "link").is_symlink() and (out / "manifest.json").is_file()  # written through the link
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left beside it


def test_train_keeps_a_config_of_the_users_in_its_output_folder(data_dir, tmp_path, monkeypatch):
    folder = tmp_path / "exp1"
    folder.mkdir()
    mine = "# my notes on this run\nmodel:\n  embed_dim: 32\n"
    (folder / "config.yaml").write_text(mine)
    result = _cli("train", folder / "config.yaml", "--data", data_dir, "--out", folder, "--no-progress")
    assert_one_line_error(result, "holds files but no model")
    assert (folder / "config.yaml").read_text() == mine
    started = tmp_path / "started"  # what a run killed in its set-up leaves is trained into again
    train_args = ("train", "--data", data_dir, "--out", started, *set_options("model", TINY),
                  *set_options("train", {"max_steps": 2, "batch_tokens": 120}), "--no-progress")

    def killed(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr("nmt.checkpoint.shutil.copyfile", killed)  # while the SentencePiece model is copied
        assert _cli(*train_args).exit_code != 0
    assert (started / "config.yaml").is_file()
    result = _cli(*train_args)
    assert result.exit_code == 0, result.output


def test_a_model_dir_with_another_sentencepiece_model_or_an_emptied_config_is_refused(model_dir, tmp_path):
    other = prepare_toy_data(tmp_path / "other", train=60, joint_vocab=False)  # the source side's alone
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    shutil.copyfile(sorted(other.glob("spm.*.model"))[0], copy / "spm.joint.model")
    src = tmp_path / "in.xx"
    src.write_text("w1 w2\n", encoding="utf-8")
    assert_one_line_error(_cli("translate", copy, "-i", src), "spm.joint.model", "not the SentencePiece model")
    shutil.copyfile(model_dir / "spm.joint.model", copy / "spm.joint.model")
    (copy / "config.yaml").write_text("")
    assert_one_line_error(_cli("translate", copy, "-i", src), "config.yaml is empty")


def test_files_of_a_newer_format_are_refused_in_one_line(model_dir, data_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    vocab = json.loads((copy / "vocab.json").read_text())
    (copy / "vocab.json").write_text(json.dumps({**vocab, "format_version": 99}))
    src = tmp_path / "in.xx"
    src.write_text("w1 w2\n", encoding="utf-8")
    assert_one_line_error(_cli("translate", copy, "-i", src), "format version 99", "upgrade nmt")
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    assert_one_line_error(_cli("train", "--data", data, "--out", tmp_path / "m", "--no-progress"), "format version 99")


def test_a_damaged_training_log_or_token_file_is_a_one_line_error(model_dir, data_dir, tmp_path):
    for name, bad in (("list", "[1, 2]\n"), ("step", '{"type": "train", "step": "x", "loss": 1}\n')):
        run = tmp_path / name
        shutil.copytree(model_dir, run)
        log = (run / "train_log.jsonl").read_text()
        (run / "train_log.jsonl").write_text(bad + log)
        result = _cli("plot", run, "--out", tmp_path / f"{name}.png")
        if name == "list":  # not a record of training: passed over
            assert result.exit_code == 0, result.output
        else:
            assert_one_line_error(result, "train_log.jsonl, line 1")
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    (data / "train.src.tokens.npy").write_bytes(b"")
    result = _cli("train", "--data", data, "--out", tmp_path / "m", "--no-progress")
    assert_one_line_error(result, "train.src.tokens.npy", "run nmt prepare again")
    shutil.rmtree(data)
    shutil.copytree(data_dir, data)
    tokens = np.load(data / "valid.tgt.tokens.npy")
    tokens[-1] = np.iinfo(tokens.dtype).max  # an id past the embedding table: an IndexError mid-run unchecked
    np.save(data / "valid.tgt.tokens.npy", tokens)
    result = _cli("train", "--data", data, "--out", tmp_path / "m", "--no-progress")
    assert_one_line_error(result, "valid.tgt", f"token id {np.iinfo(tokens.dtype).max} is outside the vocabulary")


def test_serve_refuses_a_port_out_of_range(model_dir):
    assert_one_line_error(_cli("serve", model_dir, "--port", 70000, "--device", "cpu"), "--port must be between 0 and 65535")


@pytest.mark.parametrize("option, value", [("--timeout", "nan"), ("--timeout", "inf"), ("--timeout", 0),
                                           ("--timeout", "1e12"), ("--max-lines", 0), ("--batch-wait-ms", "inf"), ("--batch-wait-ms", "nan"),
                                           ("--batch-wait-ms", -1), ("--max-alternatives", -1)])
def test_serve_refuses_limits_it_cannot_keep(model_dir, option, value, monkeypatch):
    # NaN passes no comparison, and an infinite wait stops the batching worker at its first request.
    import nmt.serve

    monkeypatch.setattr(nmt.serve, "serve", lambda *args, **kwargs: None)  # accepted: returns at once, not served
    assert_one_line_error(_cli("serve", model_dir, option, value, "--device", "cpu"), option.removeprefix("--max-"))


def test_an_update_whose_loss_alone_is_not_finite_is_skipped():
    # A loss term that sends no gradient back (here a constant) can be NaN with finite gradients.
    from nmt.translation_task import translation_loss

    model = build_model(ModelConfig(**TINY), 20, 20)
    tc = TrainConfig()
    optimizer = make_optimizer(model, tc)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nan_loss = lambda m, b, s: translation_loss(m, b, s) + torch.tensor(float("nan"))  # noqa: E731
    _, skipped, finite = training_update(model, optimizer, None, [_batch()], tc, 1e-3, torch.device("cpu"), torch.float32,
                                         compute_loss=nan_loss)
    assert bool(skipped) and not bool(finite)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_only_skipped_updates_in_a_row_stop_training(data_dir, tmp_path, monkeypatch):
    real_loss, calls = translation_task.token_loss, {"n": 0}

    def every_other_loss_nan(logits, targets, smoothing):
        calls["n"] += 1
        return real_loss(logits, targets, smoothing) * (float("nan") if calls["n"] % 2 == 0 else 1.0)

    monkeypatch.setattr(translation_task, "token_loss", every_other_loss_nan)
    result = train(_config(data_dir, tmp_path / "run", max_steps=8, max_skipped_updates=2), progress=False, log=lambda m: None)
    assert result.stop_reason == "max_steps" and result.steps == 8


def test_leftovers_are_found_by_the_folder_name_taken_literally(tmp_path):
    """A name with glob characters (run[1]) never reaches another folder's moved-aside copy (run1's)."""
    from nmt.atomic import recover_dir
    from nmt.prepare import _tidy_leftovers

    aside = tmp_path / ".run1.old-999999"  # run1's previous version, moved aside by a killed replace
    aside.mkdir()
    (aside / "weights").write_text("kept")
    recover_dir(tmp_path / "run[1]")
    _tidy_leftovers(tmp_path / "run[1]")
    assert (aside / "weights").read_text() == "kept" and not (tmp_path / "run[1]").exists()
    recover_dir(tmp_path / "run1")  # its own folder's is put back
    assert (tmp_path / "run1" / "weights").read_text() == "kept"


def test_sigterm_stops_a_command_as_ctrl_c_does_and_its_temporary_file_goes(tmp_path):
    """Python's default SIGTERM ends the process where it is; a command cleans up instead (here
    the -o file written beside its name) and exits with status 143. In a process of its own: a
    default handler would end the test run."""
    script = f"""
import os, signal, sys, time
from pathlib import Path
from types import SimpleNamespace
import nmt.translate
from nmt.atomic import open_text_atomic
from nmt_cli.main import app

def translate_file(*args, **kwargs):
    with open_text_atomic(Path({str(tmp_path)!r}) / "out.txt") as f:
        f.write("half a translation")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # interrupted at once

nmt.translate.translate_file = translate_file
app(["translate", "model"])
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, run.stderr
    assert list(tmp_path.iterdir()) == []  # no hidden .out.txt.tmp-PID left


def test_a_command_gives_sigterm_back_to_the_handler_it_found():
    before = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(app, ["evaluate"])  # a one-line error
    assert result.exit_code == 1 and signal.getsignal(signal.SIGTERM) == before


def test_a_second_training_lock_on_the_same_directory_is_refused_while_the_first_is_held(tmp_path):
    """Two runs of nmt train take the lock the same way: the second one is refused as long as
    the first one holds it, and gets it once the first has finished."""
    from nmt.checkpoint import training_lock
    from nmt.errors import CheckpointError

    with training_lock(tmp_path / "model"):
        with pytest.raises(CheckpointError, match="another training run is using"):
            with training_lock(tmp_path / "model"):
                pass
    with training_lock(tmp_path / "model"):
        pass


def test_an_overwrite_run_that_fails_after_saving_best_keeps_its_best_not_the_replaced_model(tmp_path, monkeypatch):
    """The model that --overwrite replaces goes once the new run has saved a checkpoint, best/
    included: a failure in the save of last/ that follows leaves the new best/, and no
    .replaced/ to give the old model back later."""
    import nmt.train
    from nmt.errors import CheckpointError
    from nmt.train import train

    data_dir = prepare_toy_data(tmp_path, train=40)
    save_dir = tmp_path / "model"
    train(_config(data_dir, save_dir, max_steps=2, valid_every=2), progress=False)
    old_best = (save_dir / "best" / "model.safetensors").read_bytes()
    real_save = nmt.train.save_checkpoint

    def full_disk_at_last(save_dir, name, *args, **kwargs):
        if name == "last":
            raise CheckpointError(f"could not save {save_dir / name}: No space left on device")
        return real_save(save_dir, name, *args, **kwargs)

    monkeypatch.setattr(nmt.train, "save_checkpoint", full_disk_at_last)
    with pytest.raises(CheckpointError, match="No space left"):
        train(_config(data_dir, save_dir, max_steps=2, valid_every=2, lr=1e-3), overwrite=True, progress=False)
    assert not (save_dir / ".replaced").exists()
    assert (save_dir / "best" / "model.safetensors").read_bytes() != old_best  # the new run's


def test_overwrite_leaves_a_data_folder_in_out_and_a_stop_while_dropping_keeps_the_new_model(tmp_path, monkeypatch):
    """Only a run's own files are set aside (a prepared data dir in --out stays where it is, even
    the one trained on); the old model's deletion, cut short, never costs the new one."""
    import nmt.checkpoint

    out = tmp_path / "run"
    shutil.copytree(prepare_toy_data(tmp_path / "toy", train=40), out / "data")
    train(_config(out / "data", out, max_steps=2, valid_every=2), progress=False)
    train(_config(out / "data", out, max_steps=2, valid_every=2, lr=1e-3), overwrite=True, progress=False)
    assert (out / "data" / "manifest.json").is_file() and not (out / ".replaced").exists()

    real_rmtree, cut = shutil.rmtree, []

    def cut_short_once(path, *args, **kwargs):  # a second Ctrl-C while the old model is deleted
        if Path(path).name == ".dropping" and Path(path).exists() and not cut:
            cut.append(path)
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(nmt.checkpoint.shutil, "rmtree", cut_short_once)
    with pytest.raises(KeyboardInterrupt):
        train(_config(out / "data", out, max_steps=2, valid_every=2, lr=2e-3), overwrite=True, progress=False)
    monkeypatch.undo()
    assert cut and (out / "best" / "model.safetensors").is_file()  # the new run's, not taken back
    assert read_config(out).train.lr == 2e-3
    assert not [p.name for p in out.iterdir() if p.name in (".replaced", ".dropping", ".restoring", ".replacing")]


def test_a_set_aside_cut_short_is_put_back_and_resume_finds_a_set_aside_model(tmp_path):
    from nmt.checkpoint import REPLACED, REPLACING, restore_replaced, set_aside_replaced
    from nmt.train import check_save_dir

    data_dir = prepare_toy_data(tmp_path, train=40)
    save_dir = tmp_path / "model"
    train(_config(data_dir, save_dir, max_steps=2, valid_every=2), progress=False)
    before = _files(save_dir)
    (save_dir / REPLACING).mkdir()  # killed while moving the model aside: best/ moved, the rest not
    os.replace(save_dir / "best", save_dir / REPLACING / "best")
    assert restore_replaced(save_dir) and _files(save_dir) == before
    set_aside_replaced(save_dir)  # an --overwrite run killed after writing its files, before its first checkpoint
    for path in (save_dir / REPLACED).iterdir():
        if path.is_file():
            shutil.copy(path, save_dir / path.name)
    check_save_dir(save_dir, resume=True, overwrite=False)  # resumable: given back when the run starts
    result = train(_config(data_dir, save_dir, max_steps=4, valid_every=2), resume=True, progress=False)
    assert result.steps == 4 and not (save_dir / REPLACED).exists()


def test_overwrite_sets_aside_everything_a_run_wrote_and_nothing_else(tiny_trained, tmp_path):
    """--overwrite moves the earlier model aside by the names of what a run writes: a file a run
    writes that is not among them would stay beside the new model (and a user's own file must)."""
    from nmt.checkpoint import REPLACED, restore_replaced, set_aside_replaced

    save_dir = tmp_path / "model"
    shutil.copytree(tiny_trained[1], save_dir)
    assert {"best", "last", "tensorboard"} <= {p.name for p in save_dir.iterdir()}  # a run with every kind of output
    (save_dir / "notes.txt").write_text("mine\n")
    before = _files(save_dir)
    set_aside_replaced(save_dir)
    left = sorted(p.name for p in save_dir.iterdir() if p.name != ".lock")  # the training lock stays where it is
    assert left == sorted([REPLACED, "notes.txt"])
    assert restore_replaced(save_dir) and _files(save_dir) == before


def test_a_signal_during_a_validation_stops_it_at_once_and_saves_the_update(data_dir, tmp_path, monkeypatch):
    """A validation can take minutes that a supervisor does not wait after SIGTERM: the signal
    ends it where it is, last/ holds the update it followed, and a resumed run goes on from there."""
    save_dir = tmp_path / "run"
    real_validate = translation_task.validate

    def signalled_validate(model, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(60)  # a long validation
        pytest.fail("the validation went on")

    monkeypatch.setattr(translation_task, "validate", signalled_validate)
    messages, started = [], time.monotonic()
    # log steps far apart: the cut validation's verdict alone stops the run at once
    result = train(_config(data_dir, save_dir, max_steps=8, valid_every=3, log_every=100), progress=False, log=messages.append)
    assert time.monotonic() - started < 30
    assert (result.stop_reason, result.steps) == ("signal (SIGINT)", 3)
    assert "step 3: validation stopped by SIGINT" in messages
    from nmt.files import CheckpointInfo

    assert CheckpointInfo.read(save_dir / "last").state.step == 3 and not (save_dir / "best").exists()
    records = [json.loads(line) for line in (save_dir / "train_log.jsonl").read_text().splitlines()]
    assert not [r for r in records if r["type"] == "valid"]
    monkeypatch.setattr(translation_task, "validate", real_validate)
    resumed = train(_config(data_dir, save_dir, max_steps=8, valid_every=3, keep_last=5), resume=True, progress=False)
    assert (resumed.stop_reason, resumed.steps) == ("max_steps", 8)
    records = [json.loads(line) for line in (save_dir / "train_log.jsonl").read_text().splitlines()]
    # the validation cut short is made when the run goes on, as if it had not stopped
    assert [r["step"] for r in records if r["type"] == "valid"] == [3, 6, 8]
    assert sorted(p.name for p in (save_dir / "checkpoints").iterdir()) == ["step-0000003", "step-0000006"]


def test_a_validation_cut_short_gives_back_the_trained_weights_and_the_training_mode(data_dir, tmp_path, monkeypatch):
    """The moving average of the weights is swapped out again and the model trains as before:
    with several processes, the others decide to stop at the next log step only."""
    from nmt.train import StopRequested, Trainer

    stub_signal = SimpleNamespace(interrupting=contextlib.nullcontext, received="", restore=lambda: None)
    weights = {}

    def cut_short(model, *args, **kwargs):
        weights["averaged"] = [p.detach().clone() for p in model.parameters()]
        model.eval()
        torch.set_grad_enabled(False)  # as an interrupted `torch.no_grad()` block leaves it
        torch.set_autocast_enabled("cpu", True)  # and an interrupted autocast block
        stub_signal.received = "SIGTERM"
        raise StopRequested("SIGTERM")

    monkeypatch.setattr(translation_task, "validate", cut_short)
    monkeypatch.setattr(train_module, "StopSignal", lambda: stub_signal)
    trainer_holder = {}
    real_validated = Trainer.validated

    def validated(self):
        trainer_holder["trained"] = [p.detach().clone() for p in self.model.parameters()]
        result = real_validated(self)
        trainer_holder["after"] = [p.detach().clone() for p in self.model.parameters()]
        trainer_holder["training"], trainer_holder["grad"] = self.model.training, torch.is_grad_enabled()
        trainer_holder["autocast"] = torch.is_autocast_enabled("cpu")
        return result

    monkeypatch.setattr(Trainer, "validated", validated)
    result = train(_config(data_dir, tmp_path / "run", max_steps=6, valid_every=3, ema_decay=0.5), progress=False)
    assert result.stop_reason == "signal (SIGTERM)" and result.steps == 3
    assert all(torch.equal(a, b) for a, b in zip(trainer_holder["trained"], trainer_holder["after"]))
    assert not all(torch.equal(a, b) for a, b in zip(weights["averaged"], trainer_holder["after"]))  # the average was in
    assert trainer_holder["training"] and trainer_holder["grad"] and not trainer_holder["autocast"]


def test_kept_checkpoints_without_weights_or_a_score_are_read_for_what_they_are(tmp_path):
    """A step folder a pruning left without its weights is not a checkpoint; one saved with no
    dev score ranks below every scored one (BLEU 0 included)."""
    from nmt.checkpoint import save_checkpoint, update_checkpoint_name, update_checkpoints
    from nmt.files import CheckpointInfo, TrainState

    model = torch.nn.Linear(2, 2)
    for step, last_valid in ((10, {"bleu": 0.0}), (20, {}), (30, {"bleu": 5.0})):
        save_checkpoint(tmp_path, update_checkpoint_name(step), model, CheckpointInfo(TrainState(step=step, last_valid=last_valid), "bleu"))
    assert [(c.step, c.score) for c in update_checkpoints(tmp_path)] == [(10, 0.0), (20, float("-inf")), (30, 5.0)]
    (tmp_path / update_checkpoint_name(10) / "model.safetensors").unlink()
    assert [c.step for c in update_checkpoints(tmp_path)] == [20, 30]


def test_a_missing_checkpoint_file_is_named_as_missing(tmp_path):
    from nmt.checkpoint import load_weights, verify_files
    from nmt.files import CheckpointInfo, TrainState

    with pytest.raises(CheckpointError, match="optimizer.safetensors is missing"):
        verify_files(tmp_path, CheckpointInfo(TrainState(), "bleu", sha256={"optimizer.safetensors": "00"}))
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_weights(torch.nn.Linear(2, 2), tmp_path / "none.safetensors")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_last_output_to_a_full_disk_is_a_one_line_error(tmp_path):
    text = tmp_path / "h.txt"
    text.write_text("a dog runs\n", encoding="utf-8")
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "nmt_cli", "evaluate", "--hyp", str(text), "--ref", str(text)],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == ["error: No space left on device"], done.stderr
