"""Update checkpoints kept by train.keep_last and keep_best, and runs resumed exactly where they stopped."""

import json
from pathlib import Path

from conftest import TINY_TRANSFORMER, prepare_toy_data

from nmt.checkpoint import prune_update_checkpoints, update_checkpoint_name, update_checkpoints
from nmt.config import config_from_dict
from nmt.files import CheckpointInfo, TrainState
from nmt.train import train


def _fake_checkpoint(save_dir: Path, step: int, score: float) -> None:
    directory = save_dir / update_checkpoint_name(step)
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(b"")
    CheckpointInfo(TrainState(step=step, last_valid={"bleu": score})).write(directory)


def _config(data_dir: Path, save_dir: Path, **train_options):
    return config_from_dict({
        "data_dir": str(data_dir), "save_dir": str(save_dir), "model": TINY_TRANSFORMER,
        "train": {"batch_tokens": 400, "lr": 3e-3, "warmup_steps": 20, "valid_max_sentences": 5, "log_every": 2,
                  **train_options},
    })


def test_keep_best_alone_keeps_only_the_best(tmp_path):
    # train.keep_last=0, keep_best=1: the latest checkpoints are not kept for their lateness.
    for step, score in {100: 5.0, 200: 9.0, 300: 7.0}.items():
        _fake_checkpoint(tmp_path, step, score)
    prune_update_checkpoints(tmp_path, keep_last=0, keep_best=1)
    assert [c.step for c in update_checkpoints(tmp_path)] == [200]


def test_training_keeps_the_last_validations_for_keep_last(tmp_path):
    # lr ~0: every validation scores the same, so keeping "the best" would keep the oldest ones.
    data_dir = prepare_toy_data(tmp_path, train=40)
    train(_config(data_dir, tmp_path / "m", max_steps=8, valid_every=2, keep_last=1, keep_best=0, lr=1e-12),
          progress=False)
    assert [c.step for c in update_checkpoints(tmp_path / "m")] == [8]


def test_resuming_a_finished_run_validates_no_more(tmp_path):
    data_dir = prepare_toy_data(tmp_path, train=40)
    config = _config(data_dir, tmp_path / "m", max_steps=4, valid_every=2)
    train(config, progress=False)
    result = train(config, resume=True, progress=False)
    assert result.stop_reason == "max_steps" and result.steps == 4
    records = [json.loads(line) for line in (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "valid"] == [2, 4]  # no second validation of step 4


def test_training_time_adds_up_over_resumed_runs(tmp_path):
    data_dir = prepare_toy_data(tmp_path, train=40)
    train(_config(data_dir, tmp_path / "m", max_steps=2, valid_every=2), progress=False)
    info_path = tmp_path / "m" / "last" / "info.json"
    info = json.loads(info_path.read_text())
    info["seconds"] = 100_000.0  # the earlier processes trained for a long time
    info_path.write_text(json.dumps(info))
    result = train(_config(data_dir, tmp_path / "m", max_steps=4, valid_every=2), resume=True, progress=False)
    assert result.steps == 4 and result.seconds >= 100_000
    assert CheckpointInfo.read(tmp_path / "m" / "last").state.seconds >= 100_000


def test_a_run_resumed_mid_epoch_continues_with_the_epochs_next_batches(tmp_path):
    from safetensors.torch import load_file

    data_dir = prepare_toy_data(tmp_path, train=60)
    settings = dict(valid_every=100, log_every=1, batch_tokens=60, warmup_steps=2)
    train(_config(data_dir, tmp_path / "a", max_steps=6, **settings), progress=False)
    train(_config(data_dir, tmp_path / "b", max_steps=3, **settings), progress=False)
    assert CheckpointInfo.read(tmp_path / "b" / "last").state.group_in_epoch == 3  # stopped mid-epoch
    train(_config(data_dir, tmp_path / "b", max_steps=6, **settings), resume=True, progress=False)

    def losses(name):
        records = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if r["type"] == "train"}

    assert losses("a") == losses("b")
    a, b = (load_file(str(tmp_path / name / "last" / "model.safetensors")) for name in ("a", "b"))
    assert all(a[name].equal(b[name]) for name in a)


def _records(save_dir: Path, kind: str) -> list[dict]:
    records = [json.loads(line) for line in (save_dir / "train_log.jsonl").read_text().splitlines()]
    return [r for r in records if r["type"] == kind]


def test_patience_counts_only_scheduled_validations_and_a_stopped_run_stays_stopped(tmp_path):
    # lr ~0: every validation scores the same, so the first one is the best and patience runs out
    # two validations later, at update 12, whether or not the run stopped (and validated) at 2.
    data_dir = prepare_toy_data(tmp_path, train=40)
    settings = dict(valid_every=4, patience=2, lr=1e-12, batch_tokens=60)
    whole = train(_config(data_dir, tmp_path / "a", max_steps=20, **settings), progress=False)
    train(_config(data_dir, tmp_path / "b", max_steps=2, **settings), progress=False)
    resumed = train(_config(data_dir, tmp_path / "b", max_steps=20, **settings), resume=True, progress=False)
    assert (whole.stop_reason, whole.steps) == (resumed.stop_reason, resumed.steps) == ("patience", 12)
    assert [r["step"] for r in _records(tmp_path / "b", "valid")] == [2, 4, 8, 12]
    again = train(_config(data_dir, tmp_path / "a", max_steps=20, **settings), resume=True, progress=False)
    assert (again.stop_reason, again.steps) == ("patience", 12)  # no more updates, no more validations
    assert again.epochs == whole.epochs
    assert [r["step"] for r in _records(tmp_path / "a", "valid")] == [4, 8, 12]


def _signalled_at(step: int, monkeypatch) -> None:
    """Training is sent SIGTERM during update `step` (in this test's monkeypatch context)."""
    from nmt.train import Trainer

    stop_after_update = Trainer.stop_after_update

    def signalled(self):
        if self.state.step == step:
            self.stop_signal.received = "SIGTERM"
        return stop_after_update(self)

    monkeypatch.setattr(Trainer, "stop_after_update", signalled)


def test_a_run_stopped_by_a_signal_at_its_last_update_validates_it_when_resumed(tmp_path, monkeypatch):
    data_dir = prepare_toy_data(tmp_path, train=40)
    config = _config(data_dir, tmp_path / "m", max_steps=6, valid_every=4)
    with monkeypatch.context() as patch:
        _signalled_at(6, patch)
        assert train(config, progress=False).stop_reason == "signal (SIGTERM)"
    assert train(config, resume=True, progress=False).stop_reason == "max_steps"
    assert [r["step"] for r in _records(tmp_path / "m", "valid")] == [4, 6]
    assert CheckpointInfo.read(tmp_path / "m" / "last").state.last_valid["step"] == 6


def test_a_run_stopped_by_a_signal_between_validations_validates_on_schedule_when_resumed(tmp_path, monkeypatch):
    """Saved at the stop, not validated there (nor on the way out); resumed, it validates where
    the schedule says, as if it had not stopped."""
    from nmt.checkpoint import update_checkpoints

    data_dir = prepare_toy_data(tmp_path, train=40)
    config = _config(data_dir, tmp_path / "m", max_steps=10, valid_every=4, keep_last=5)
    messages = []
    with monkeypatch.context() as patch:
        _signalled_at(5, patch)
        assert train(config, progress=False, log=messages.append).stop_reason == "signal (SIGTERM)"
    assert [r["step"] for r in _records(tmp_path / "m", "valid")] == [4]
    assert not [m for m in messages if "validation" in m]  # none begun on the way out
    assert train(config, resume=True, progress=False).stop_reason == "max_steps"
    assert [r["step"] for r in _records(tmp_path / "m", "valid")] == [4, 8, 10]
    assert [c.step for c in update_checkpoints(tmp_path / "m")] == [4, 8]


def test_a_stop_between_log_steps_logs_the_updates_since_the_last_one(tmp_path):
    data_dir = prepare_toy_data(tmp_path, train=40)
    train(_config(data_dir, tmp_path / "m", max_steps=5, valid_every=100, log_every=2), progress=False)
    assert [r["step"] for r in _records(tmp_path / "m", "train")] == [2, 4, 5]


def test_a_resumed_run_takes_the_configs_optimizer_settings(tmp_path):
    data_dir = prepare_toy_data(tmp_path, train=40)
    train(_config(data_dir, tmp_path / "m", max_steps=2, valid_every=2), progress=False)
    train(_config(data_dir, tmp_path / "m", max_steps=4, valid_every=2, weight_decay=0.1, betas=[0.8, 0.9]),
          resume=True, progress=False)
    (group,) = CheckpointInfo.read(tmp_path / "m" / "last").param_groups
    assert group["weight_decay"] == 0.1 and group["betas"] == [0.8, 0.9]


def test_a_resumed_fp16_run_keeps_its_loss_scale(tmp_path, monkeypatch):
    """A scale too high for the gradients: the first updates overflow and lower it. Resumed, the
    run must go on from the lowered scale, not skip those updates again."""
    import torch
    from safetensors.torch import load_file

    class HighScale(torch.amp.GradScaler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "init_scale": 2.0**20})

    monkeypatch.setattr(torch.amp, "GradScaler", HighScale)
    data_dir = prepare_toy_data(tmp_path, train=40)
    settings = dict(valid_every=100, log_every=1, batch_tokens=60, precision="fp16", device="cpu")
    train(_config(data_dir, tmp_path / "a", max_steps=12, **settings), progress=False)
    train(_config(data_dir, tmp_path / "b", max_steps=6, **settings), progress=False)
    assert CheckpointInfo.read(tmp_path / "b" / "last").loss_scale["scale"] < 2.0**20
    train(_config(data_dir, tmp_path / "b", max_steps=12, **settings), resume=True, progress=False)
    skipped = {name: sum(r.get("skipped_updates", 0) for r in _records(tmp_path / name, "train")) for name in "ab"}
    assert skipped["a"] == skipped["b"] > 0
    a, b = (load_file(str(tmp_path / name / "last" / "model.safetensors")) for name in ("a", "b"))
    assert all(a[name].equal(b[name]) for name in a)


def test_a_validation_at_a_stop_between_two_stops_nothing_when_resumed(tmp_path, monkeypatch):
    """target_bleu is met at every validation: the run stops at the first scheduled one, 4,
    whether or not it stopped (and validated) at 2 before."""
    from nmt.translation_task import TranslationTask

    monkeypatch.setattr(TranslationTask, "validate", lambda self, *args: {"loss": 1.0, "ppl": 2.7, "bleu": 50.0})
    data_dir = prepare_toy_data(tmp_path, train=40)
    settings = dict(valid_every=4, target_bleu=40.0)
    whole = train(_config(data_dir, tmp_path / "a", max_steps=20, **settings), progress=False)
    train(_config(data_dir, tmp_path / "b", max_steps=2, **settings), progress=False)
    resumed = train(_config(data_dir, tmp_path / "b", max_steps=20, **settings), resume=True, progress=False)
    assert (whole.stop_reason, whole.steps) == (resumed.stop_reason, resumed.steps) == ("target_bleu", 4)


def test_a_best_saved_after_the_last_last_is_kept_on_resume(tmp_path):
    """Killed (or out of disk) between saving best/ and last/: last/ knows an older best score,
    and the resumed run must not replace best/ with a worse model."""
    data_dir = prepare_toy_data(tmp_path, train=40)
    train(_config(data_dir, tmp_path / "m", max_steps=8, valid_every=4), progress=False)
    best = CheckpointInfo.read(tmp_path / "m" / "best")
    best.state.best_score, best.state.best_step = 99.0, 8  # a score no validation of the toy reaches
    best.write(tmp_path / "m" / "best")
    assert CheckpointInfo.read(tmp_path / "m" / "last").state.best_score < 99.0
    train(_config(data_dir, tmp_path / "m", max_steps=12, valid_every=4), resume=True, progress=False)
    assert CheckpointInfo.read(tmp_path / "m" / "best").state.best_score == 99.0  # not replaced
    assert CheckpointInfo.read(tmp_path / "m" / "last").state.best_score == 99.0


def test_a_resumed_run_already_past_max_epochs_reports_its_epochs(tmp_path):
    data_dir = prepare_toy_data(tmp_path, train=40)
    first = train(_config(data_dir, tmp_path / "m", max_epochs=1, valid_every=100), progress=False)
    train(_config(data_dir, tmp_path / "m", max_steps=first.steps + 1, valid_every=100), resume=True, progress=False)
    again = train(_config(data_dir, tmp_path / "m", max_epochs=1, valid_every=100), resume=True, progress=False)
    assert again.stop_reason == "max_epochs" and again.steps == first.steps + 1
    assert again.epochs == round(1 + 1 / first.steps, 2)  # one update into the second epoch


def test_a_run_resumed_after_its_time_ran_out_makes_no_more_updates(tmp_path, monkeypatch):
    """train.max_minutes counts the training time of the earlier processes of a run: resumed
    with less time than it has had already, it stops before its first update."""
    import itertools
    import time
    from types import SimpleNamespace

    import nmt.train
    from nmt.files import CheckpointInfo
    from nmt.train import train

    data_dir = prepare_toy_data(tmp_path, train=40)
    with monkeypatch.context() as patch:  # a clock a second further on at each look: the time saved is not 0.0
        clock = itertools.count(time.time(), 1.0)
        patch.setattr(nmt.train, "time", SimpleNamespace(time=lambda: next(clock), monotonic=time.monotonic))
        train(_config(data_dir, tmp_path / "m", max_steps=4, valid_every=4), progress=False)
    seconds = CheckpointInfo.read(tmp_path / "m" / "last").state.seconds
    assert seconds > 0
    result = train(_config(data_dir, tmp_path / "m", max_minutes=seconds / 2 / 60, valid_every=4),
                   resume=True, progress=False)
    assert (result.steps, result.stop_reason) == (4, "max_minutes")


def test_kept_update_checkpoints_are_named_by_their_zero_padded_step(tmp_path):
    """checkpoints/step-0000090 before checkpoints/step-0000100: the folder names sort as their
    steps do, in `ls` as in a file browser."""
    from nmt.checkpoint import update_checkpoint_name, update_checkpoints
    from nmt.files import CheckpointInfo, TrainState

    for step in (90, 100):
        directory = tmp_path / update_checkpoint_name(step)
        directory.mkdir(parents=True)
        (directory / "model.safetensors").write_bytes(b"")
        CheckpointInfo(TrainState(step=step, last_valid={"bleu": 1.0})).write(directory)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000090", "step-0000100"]
    assert [c.path.name for c in update_checkpoints(tmp_path)] == ["step-0000090", "step-0000100"]
