import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY_RNN, TINY_TRANSFORMER, set_options, toy_pairs, write_pairs
from safetensors.torch import load_file

from nmt.checkpoint import load_for_inference
from nmt.config import DecodeConfig, config_from_dict
from nmt.data import ParallelSplit
from nmt.errors import ConfigError
from nmt.files import Manifest
from nmt.prepare import PrepareConfig, prepare
from nmt.tokenizer import UNK
from nmt.train import Trainer, decaying_lr, inverse_sqrt_lr, train
from nmt.translate import translate_lines
from nmt.translation_task import TranslationTask

TINY_MODELS = {
    "transformer": {"arch": "transformer", "embed_dim": 64, "ff_dim": 128, "heads": 4, "enc_layers": 2,
                    "dec_layers": 2, "dropout": 0.0},
    "rnn": TINY_RNN,
}


@pytest.fixture
def tiny_data(tmp_path):
    pairs = toy_pairs(12, seed=11)
    write_pairs(tmp_path / "c" / "train", pairs)
    write_pairs(tmp_path / "c" / "valid", toy_pairs(4, seed=12))
    write_pairs(tmp_path / "c" / "test", toy_pairs(4, seed=13))
    prepare(PrepareConfig(
        out_dir=tmp_path / "data", src_lang="xx", tgt_lang="yy", vocab_size=40,
        train_prefix=str(tmp_path / "c" / "train"), valid_prefix=str(tmp_path / "c" / "valid"),
        test_prefix=str(tmp_path / "c" / "test"),
    ))
    return tmp_path / "data", pairs


def _config(data_dir, save_dir, model, **train):
    return config_from_dict({
        "data_dir": str(data_dir), "save_dir": str(save_dir), "model": model,
        "train": {"batch_tokens": 500, "lr": 3e-3, "warmup_steps": 20, "label_smoothing": 0.0,
                  "valid_every": 1000, "log_every": 10, **train},
    })


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["transformer", "rnn"])
def test_pipeline_overfits_tiny_corpus(tiny_data, tmp_path, arch):
    data_dir, pairs = tiny_data
    result = train(_config(data_dir, tmp_path / "model", TINY_MODELS[arch], max_steps=250), progress=False)
    assert result.steps == 250 and (tmp_path / "model" / "best" / "model.safetensors").is_file()
    model, tokenizer, config = load_for_inference(tmp_path / "model", "last")
    for beam in (1, 4):
        out = translate_lines(model, tokenizer, [s for s, _ in pairs], DecodeConfig(beam=beam), "cpu")
        assert [texts[0] for texts in out.texts] == [t for _, t in pairs]
    log = [json.loads(line) for line in (tmp_path / "model" / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["type"] == "train"]
    assert losses[-1] < 0.05 * losses[0]


def test_resume_matches_uninterrupted_run(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    model = {**TINY_MODELS["transformer"], "dropout": 0.3}
    settings = dict(valid_every=4, log_every=1, batch_tokens=60)
    train(_config(data_dir, tmp_path / "a", model, max_steps=10, **settings), progress=False)
    train(_config(data_dir, tmp_path / "b", model, max_steps=4, **settings), progress=False)
    result = train(_config(data_dir, tmp_path / "b", model, max_steps=10, **settings), resume=True, progress=False)
    assert result.steps == 10

    def losses(name):
        records = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if r["type"] == "train"}

    assert losses("a") == losses("b")
    again = train(_config(data_dir, tmp_path / "b", model, max_steps=10, **settings), resume=True, progress=False)
    assert again.steps == 10 and again.stop_reason == "max_steps"  # a finished run stays finished
    assert again.epochs == result.epochs
    assert losses("b") == losses("a")
    # So does one that ran out of time: resumed with more steps but the same time, it trains none.
    timed_out = train(_config(data_dir, tmp_path / "b", model, max_steps=20, max_minutes=1e-6, **settings),
                      resume=True, progress=False)
    assert timed_out.steps == 10 and timed_out.stop_reason == "max_minutes"
    assert losses("b") == losses("a")


def test_a_stop_between_validations_counts_for_neither_patience_nor_kept_checkpoints(tiny_data, tmp_path):
    from nmt.checkpoint import update_checkpoints
    from nmt.files import CheckpointInfo

    data_dir, _ = tiny_data
    model = TINY_MODELS["transformer"]
    settings = dict(valid_every=4, log_every=1, batch_tokens=60, keep_last=5, patience=100, lr=1e-5)  # no gains
    train(_config(data_dir, tmp_path / "a", model, max_steps=12, **settings), progress=False)
    train(_config(data_dir, tmp_path / "b", model, max_steps=6, **settings), progress=False)  # validates at 6 too
    train(_config(data_dir, tmp_path / "b", model, max_steps=12, **settings), resume=True, progress=False)
    assert [c.step for c in update_checkpoints(tmp_path / "a")] == [c.step for c in update_checkpoints(tmp_path / "b")]
    states = [CheckpointInfo.read(tmp_path / name / "last").state for name in ("a", "b")]
    assert states[0].bad_validations == states[1].bad_validations
    # The stop's validation is not kept, and averaging the last validations does not look for it.
    from nmt.average import choose_checkpoints

    train(_config(data_dir, tmp_path / "stopped", model, max_steps=6, **settings), progress=False)
    assert [c.step for c in choose_checkpoints(tmp_path / "stopped", last=1)] == [4]


def test_inverse_sqrt_schedule():
    assert inverse_sqrt_lr(50, 1e-3, 100) == pytest.approx(5e-4)
    assert inverse_sqrt_lr(100, 1e-3, 100) == pytest.approx(1e-3)
    assert inverse_sqrt_lr(400, 1e-3, 100) == pytest.approx(5e-4)


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_decaying_schedules_reach_min_lr_at_the_budget(shape):
    def lr(step):
        return decaying_lr(step, 1e-3, 100, 500, min_lr=1e-5, shape=shape)

    assert lr(50) == pytest.approx(5e-4) and lr(100) == pytest.approx(1e-3)  # the same warmup
    assert lr(300) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)  # halfway: half of the range for both shapes
    assert lr(500) == pytest.approx(1e-5) and lr(800) == pytest.approx(1e-5)
    decay = [lr(step) for step in range(100, 501)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    linear_at_200 = 1e-5 + (1e-3 - 1e-5) * 0.75
    assert (lr(200) > linear_at_200) == (shape == "cosine")  # the cosine stays high longer, then falls faster


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_trainer_follows_the_decaying_schedule(tiny_data, tmp_path, schedule):
    data_dir, _ = tiny_data
    config = _config(data_dir, tmp_path / "m", TINY_MODELS["transformer"], max_steps=12, warmup_steps=4,
                     log_every=1, lr_schedule=schedule, min_lr=1e-4, valid_every=12)
    train(config, progress=False)
    records = [json.loads(line) for line in (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if r["type"] == "train"}
    assert lrs == {step: pytest.approx(decaying_lr(step, 3e-3, 4, 12, 1e-4, schedule)) for step in range(1, 13)}
    assert lrs[12] == pytest.approx(1e-4)


def test_a_decaying_schedule_needs_a_budget_in_updates():
    with pytest.raises(ConfigError, match="max_steps"):
        config_from_dict({"train": {"lr_schedule": "linear", "warmup_steps": 100}})
    with pytest.raises(ConfigError, match="max_steps"):
        config_from_dict({"train": {"lr_schedule": "cosine", "warmup_steps": 100, "max_steps": 100}})
    with pytest.raises(ConfigError, match="lr_schedule"):
        config_from_dict({"train": {"lr_schedule": "step"}})


def test_an_interval_is_timed_after_the_devices_queued_work():
    """Reading the loss waits for the GPU's queued updates: that wait belongs to the interval."""
    import time

    from nmt.distributed import Ranks
    from nmt.train import Interval

    class QueuedLoss:
        def __float__(self) -> float:
            time.sleep(0.3)
            return 600.0

    interval = Interval(torch.device("cpu"))
    interval.loss, interval.loss_tokens, interval.tgt_tokens = QueuedLoss(), torch.tensor(300), 300
    record = interval.record(step=1, epoch=0.0, lr=1e-3, ranks=Ranks())
    assert record["loss"] == 2.0 and record["tgt_tokens_per_s"] <= 1000  # 300 tokens in at least 0.3 s


@pytest.mark.parametrize("key, value", [("direction_weights", {"xx-yy": 2.0}), ("lang_temperature", 2.0)])
def test_direction_sampling_needs_a_multilingual_data_dir(tiny_data, tmp_path, key, value):
    data_dir, _ = tiny_data
    config = _config(data_dir, tmp_path / "m", TINY_MODELS["transformer"], max_steps=2)
    setattr(config.train, key, value)
    with pytest.raises(ConfigError, match=f"{key} needs a multilingual data dir"):
        train(config, progress=False)
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_sigterm_saves_last_checkpoint_and_resume_continues(tiny_data, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    data_dir, _ = tiny_data
    save_dir = tmp_path / "model"
    command = [sys.executable, "-m", "nmt_cli", "train", "--data", str(data_dir), "--out", str(save_dir),
               "--set", "model.embed_dim=32", "--set", "model.ff_dim=64", "--set", "model.heads=2",
               "--set", "train.batch_tokens=60", "--set", "train.log_every=1", "--set", "train.valid_every=100000",
               "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = save_dir / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and log.read_text().count("\n") >= 5):
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "stopped by SIGTERM" in output and "Traceback" not in output
    info = json.loads((save_dir / "last" / "info.json").read_text())
    assert info["step"] >= 5
    resumed = subprocess.run(command[:-1] + ["--set", f"train.max_steps={info['step'] + 3}", "--resume", "--no-progress"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"trained {info['step'] + 3} steps" in resumed.stdout

    # The interrupted and resumed run trained exactly as an uninterrupted one (dropout included).
    model = {"embed_dim": 32, "ff_dim": 64, "heads": 2}
    train(_config(data_dir, tmp_path / "whole", model, max_steps=info["step"] + 3, batch_tokens=60, log_every=1,
                  valid_every=100000, lr=5e-4, warmup_steps=4000, label_smoothing=0.1), progress=False)

    def losses(directory):
        records = [json.loads(line) for line in (directory / "train_log.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if r["type"] == "train"}

    assert losses(save_dir) == losses(tmp_path / "whole")


@pytest.mark.parametrize("arch", ["transformer", "rnn"])
def test_mixed_precision_training_step(tiny_data, tmp_path, arch):
    data_dir, _ = tiny_data
    model = {**TINY_MODELS[arch], "cell": "lstm"} if arch == "rnn" else TINY_MODELS[arch]
    result = train(_config(data_dir, tmp_path / "m", model, max_steps=3, precision="bf16"), progress=False)
    assert result.steps == 3 and result.last_valid["loss"] > 0


@pytest.mark.slow
def test_target_bleu_stops_training_and_logs_training_seconds(toy_corpus, tmp_path):
    prepare(PrepareConfig(
        out_dir=tmp_path / "data", src_lang="xx", tgt_lang="yy", vocab_size=40,
        train_prefix=str(toy_corpus / "train"), valid_prefix=str(toy_corpus / "valid"),
        test_prefix=str(toy_corpus / "test"),
    ))
    config = _config(tmp_path / "data", tmp_path / "m", TINY_MODELS["transformer"], max_steps=1000,
                     valid_every=20, target_bleu=60.0)
    result = train(config, progress=False)
    valid = [json.loads(line) for line in (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()]
    valid = [r for r in valid if r["type"] == "valid"]
    assert result.stop_reason == "target_bleu" and result.steps < 1000
    assert valid[-1]["bleu"] >= 60.0 and all(r["bleu"] < 60.0 for r in valid[:-1])
    assert all(0 < r["train_seconds"] <= r["seconds"] for r in valid)


def test_training_metrics_are_mirrored_to_tensorboard(tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data_dir, _ = tiny_data
    config = _config(data_dir, tmp_path / "m", TINY_MODELS["transformer"], max_steps=8, log_every=2, valid_every=4)
    train(config, progress=False)
    train(config, overwrite=True, progress=False)  # --overwrite starts the TensorBoard log again too
    events = EventAccumulator(str(tmp_path / "m" / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()]
    train_loss = {r["step"]: r["loss"] for r in records if r["type"] == "train"}
    dev_bleu = {r["step"]: r["bleu"] for r in records if r["type"] == "valid"}
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(train_loss)
    assert {e.step: e.value for e in events.Scalars("dev/bleu")} == pytest.approx(dev_bleu)
    assert sorted(train_loss) == [2, 4, 6, 8] and sorted(dev_bleu) == [4, 8]
    assert len(events.Scalars("train/loss")) == 4 and len(list((tmp_path / "m" / "tensorboard").iterdir())) == 1
    assert {"train/lr", "dev/loss", "dev/ppl"} <= set(events.Tags()["scalars"])


def test_resume_refuses_settings_that_change_the_batches(tiny_data, tmp_path):
    from nmt.errors import ConfigError
    from nmt.train import check_same_batches

    data_dir, _ = tiny_data
    model = TINY_MODELS["transformer"]
    train(_config(data_dir, tmp_path / "m", model, max_steps=2), progress=False)
    for key, value in (("batch_tokens", 400), ("accum_steps", 2), ("seed", 7)):
        with pytest.raises(ConfigError, match=f"train.{key} is {value!r} but the run in .* was trained with"):
            train(_config(data_dir, tmp_path / "m", model, max_steps=4, **{key: value}), resume=True, progress=False)
    with pytest.raises(ConfigError, match="trained with 1 process"):
        check_same_batches(tmp_path / "m", _config(data_dir, tmp_path / "m", model), processes=2)
    # A weight of 1 is no weight: the batches are the saved run's.
    check_same_batches(tmp_path / "m", _config(data_dir, tmp_path / "m", model, direction_weights={"en-cs": 1.0}), 1)
    with pytest.raises(ConfigError, match="train.direction_weights is"):
        check_same_batches(tmp_path / "m", _config(data_dir, tmp_path / "m", model, direction_weights={"en-cs": 2.0}), 1)
    assert train(_config(data_dir, tmp_path / "m", model, max_steps=4), resume=True, progress=False).steps == 4


def test_a_resume_with_other_processes_is_refused_before_torchrun_starts(tiny_data, tmp_path, monkeypatch):
    """One line from the launcher, not one per process among torchrun's own."""
    from conftest import assert_one_line_error
    from nmt_cli.main import app
    from typer.testing import CliRunner

    import nmt.train

    data_dir, _ = tiny_data
    train(_config(data_dir, tmp_path / "m", TINY_MODELS["transformer"], max_steps=2), progress=False)
    monkeypatch.setattr(nmt.train, "start_processes", lambda *args: pytest.fail("torchrun started"))
    result = CliRunner().invoke(app, ["train", str(tmp_path / "m" / "config.yaml"), "--out", str(tmp_path / "m"),
                                      "--resume", "--devices", "2", "--device", "cpu", "--set", "train.max_steps=4"])
    assert_one_line_error(result, "trained with 1 process(es), this one has 2")


def test_resume_refuses_another_data_dir(tiny_data, tmp_path):
    """The same vocabulary is not enough: other pairs (or languages, or directions) would train
    on other batches and pick best/ on another dev set."""
    import shutil

    from nmt.errors import CheckpointError

    data_dir, _ = tiny_data
    model = TINY_MODELS["transformer"]
    train(_config(data_dir, tmp_path / "m", model, max_steps=2), progress=False)
    other = tmp_path / "other"
    shutil.copytree(data_dir, other)  # a copy elsewhere is the same data
    assert train(_config(other, tmp_path / "m", model, max_steps=3), resume=True, progress=False).steps == 3
    manifest = Manifest.read(other)
    renamed = dataclasses.replace(manifest, src_lang="zz")
    renamed.write(other)
    with pytest.raises(CheckpointError, match=r"other data \(languages xx-yy; data dir .* has zz-yy\)"):
        train(_config(other, tmp_path / "m", model, max_steps=4), resume=True, progress=False)
    fewer = dataclasses.replace(manifest, counts={**manifest.counts, "train": {**manifest.counts["train"], "pairs": 5}})
    fewer.write(other)
    with pytest.raises(CheckpointError, match=r"training pairs 12; data dir .* has 5"):
        train(_config(other, tmp_path / "m", model, max_steps=4), resume=True, progress=False)


def test_patience_and_max_epochs_stop_training(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    model = TINY_MODELS["transformer"]
    # With a learning rate this small the dev BLEU cannot improve after the first validation.
    result = train(_config(data_dir, tmp_path / "p", model, lr=1e-9, valid_every=1, patience=2, max_steps=50),
                   progress=False)
    assert (result.stop_reason, result.steps, result.best_step) == ("patience", 3, 1)
    result = train(_config(data_dir, tmp_path / "e", model, max_epochs=3, batch_tokens=60), progress=False)
    assert result.stop_reason == "max_epochs" and result.epochs == 3.0 and result.steps % 3 == 0


def test_masked_lm_accuracy_goes_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nmt.train_log import TrainLog

    log = TrainLog(tmp_path, tensorboard=True, warn=print)
    log.write({"type": "valid", "step": 3, "loss": 2.0, "ppl": 7.4, "accuracy": 41.5, "nsp_accuracy": 80.0,
               "metric": "accuracy", "metric_name": "masked accuracy"})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("dev/accuracy")] == [41.5]
    assert [e.value for e in events.Scalars("dev/nsp_accuracy")] == [80.0]
    assert set(events.Tags()["scalars"]) == {"dev/loss", "dev/ppl", "dev/accuracy", "dev/nsp_accuracy"}  # numbers only, no step


@pytest.mark.slow
def test_progress_without_a_terminal_is_one_plain_line_per_log_step(tiny_data, tmp_path):
    import subprocess
    import sys

    data_dir, _ = tiny_data
    result = subprocess.run(
        [sys.executable, "-m", "nmt_cli", "train", "--data", str(data_dir), "--out", str(tmp_path / "m"),
         *set_options("model", TINY_TRANSFORMER), *set_options("train", {"max_steps": 6, "log_every": 2, "batch_tokens": 60})],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("step ") and "loss" in line and "dev" not in line]
    assert [line.split(":")[0] for line in lines] == ["step 2/6", "step 4/6", "step 6/6"]


def test_word_dropout_is_applied_to_training_batches_only(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    manifest = Manifest.read(data_dir)
    plain = TranslationTask(_config(data_dir, tmp_path / "m", TINY_MODELS["transformer"]), data_dir, manifest)
    dropping = TranslationTask(
        _config(data_dir, tmp_path / "m", TINY_MODELS["transformer"], word_dropout=0.5), data_dir, manifest
    )
    rows = np.arange(len(plain.train_split))
    batch = dropping.make_batch(rows, False, 1, 0)
    assert (batch.src == UNK).any() and not (plain.make_batch(rows, False, 1, 0).src == UNK).any()
    assert torch.equal(dropping.make_batch(rows, False, 1, 0).src, batch.src)  # a resumed run drops the same
    assert not torch.equal(dropping.make_batch(rows, False, 1, 1).src, batch.src)
    torch.manual_seed(0)
    model = plain.build_model()
    cpu = torch.device("cpu")
    assert dropping.validate(model, cpu, torch.float32) == plain.validate(model, cpu, torch.float32)


def test_pairs_longer_than_a_batch_are_named_when_training_starts(tiny_data, tmp_path):
    data_dir, _ = tiny_data
    manifest = Manifest.read(data_dir)
    split = ParallelSplit.load(data_dir, "train")
    longest = int(np.maximum(split.src.lengths, split.tgt.lengths).max()) + 1
    fits = TranslationTask(_config(data_dir, tmp_path / "m", TINY_MODELS["transformer"], batch_tokens=longest), data_dir, manifest)
    assert fits.describe() == f"{len(split)} training pairs"
    tight = TranslationTask(_config(data_dir, tmp_path / "m", TINY_MODELS["transformer"], batch_tokens=longest - 1),
                            data_dir, manifest)
    over = int((np.maximum(split.src.lengths, split.tgt.lengths) + 1 == longest).sum())
    assert tight.describe().endswith(f"; {over} of them longer than train.batch_tokens ({longest - 1}), "
                                     "each trained as a batch of its own")


def test_an_update_budget_gives_the_same_model_on_a_slow_machine(tiny_data, tmp_path, monkeypatch):
    """max_steps decides, not the clock: a machine whose updates take 100 s each still makes
    them all (max_minutes is only a safety limit) and ends with the same weights."""
    data_dir, _ = tiny_data
    budget = dict(max_steps=9, max_minutes=60.0, batch_tokens=60)
    fast = train(_config(data_dir, tmp_path / "fast", TINY_MODELS["transformer"], **budget), progress=False)
    monkeypatch.setattr(Trainer, "elapsed", lambda self: 100.0 * self.state.step)
    slow = train(_config(data_dir, tmp_path / "slow", TINY_MODELS["transformer"], **budget), progress=False)
    assert fast.steps == slow.steps == 9
    weights = [load_file(tmp_path / run / "last" / "model.safetensors") for run in ("fast", "slow")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    monkeypatch.setattr(Trainer, "elapsed", lambda self: 1000.0 * self.state.step)  # 3.6 updates an hour
    assert train(_config(data_dir, tmp_path / "slower", TINY_MODELS["transformer"], **budget),
                 progress=False).steps == 4


def test_the_inverse_sqrt_schedule_never_falls_below_min_lr():
    """train.min_lr is a floor under the inverse-square-root decay as under the decaying schedules:
    the rate follows peak·sqrt(warmup/step) until that passes min_lr, then stays at min_lr."""
    from nmt.config import TrainConfig
    from nmt.train import inverse_sqrt_lr, scheduled_lr

    assert inverse_sqrt_lr(200, 1e-3, 100, min_lr=6e-4) == pytest.approx(1e-3 * math.sqrt(0.5))  # above the floor
    assert inverse_sqrt_lr(400, 1e-3, 100, min_lr=6e-4) == pytest.approx(6e-4)  # 5e-4 unfloored
    assert inverse_sqrt_lr(10_000, 1e-3, 100, min_lr=6e-4) == pytest.approx(6e-4)
    tc = TrainConfig(lr=1e-3, warmup_steps=100, min_lr=6e-4)  # the default schedule, inverse_sqrt
    assert scheduled_lr(400, tc) == pytest.approx(6e-4)
