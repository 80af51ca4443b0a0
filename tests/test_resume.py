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
