"""train.ema_decay: the moving average of the weights is what validation scores and checkpoints
hold, it leaves the training itself unchanged, and a resumed run continues it exactly."""

import pytest
import torch
from conftest import TINY_TRANSFORMER, prepare_toy_data
from safetensors.torch import load_file

from nmt.checkpoint import TRAINED_WEIGHTS, load_for_inference
from nmt.config import config_from_dict
from nmt.ema import WeightAverage, ema_decay_at
from nmt.errors import ConfigError
from nmt.files import CheckpointInfo, Manifest
from nmt.train import train
from nmt.translation_task import TranslationTask

STEPS = 12


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_toy_data(tmp_path_factory.mktemp("ema"), train=60)


def _config(data_dir, save_dir, **train_options):
    return config_from_dict({
        "data_dir": str(data_dir), "save_dir": str(save_dir), "model": TINY_TRANSFORMER,
        "train": {"max_steps": STEPS, "batch_tokens": 120, "lr": 3e-3, "warmup_steps": 5, "valid_every": 4,
                  "valid_max_sentences": 5, "log_every": 4, **train_options},
    })


def _weights(run, name="last"):
    return load_file(str(run / name / "model.safetensors"))


def _trained(run):
    tensors = load_file(str(run / "last" / "optimizer.safetensors"))
    return {k[len(TRAINED_WEIGHTS):]: v for k, v in tensors.items() if k.startswith(TRAINED_WEIGHTS)}


def test_the_average_follows_its_formula():
    model = torch.nn.Linear(3, 2)
    start = [p.detach().clone() for p in model.parameters()]
    average = WeightAverage(model, decay=0.9)
    steps = []
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        average.update(model, step)
        steps.append(ema_decay_at(step, 0.9))
    # Parameters rose by 1 per update: the average of start + k, k = 1..5, with the decays above.
    expected_shift = 0.0
    for k, decay in enumerate(steps, start=1):
        expected_shift = decay * expected_shift + (1 - decay) * k
    for first, averaged in zip(start, average.averaged):
        torch.testing.assert_close(averaged, first + expected_shift)
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1) and ema_decay_at(10**6, 0.999) == 0.999


def test_swapped_in_restores_the_trained_weights():
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, decay=0.5)
    with torch.no_grad():
        model.weight.mul_(3.0)
    trained = model.weight.detach().clone()
    with average.swapped_in(model):
        torch.testing.assert_close(model.weight, trained / 3.0)
    assert torch.equal(model.weight, trained)


def test_checkpoints_hold_the_average_and_training_is_unchanged(data_dir, tmp_path):
    plain, averaged = tmp_path / "plain", tmp_path / "ema"
    train(_config(data_dir, plain), progress=False)
    train(_config(data_dir, averaged, ema_decay=0.9), progress=False)
    trained = _trained(averaged)
    # The trained weights are those of the run without the average: it never feeds back.
    plain_weights = dict(load_for_inference(plain, "last")[0].named_parameters())
    assert trained.keys() == plain_weights.keys()
    for name, value in trained.items():
        torch.testing.assert_close(value, plain_weights[name].detach(), rtol=0, atol=0)
    # last/ holds the average, which differs from the trained weights.
    ema_weights = _weights(averaged)
    assert any(not torch.equal(ema_weights[name], value) for name, value in trained.items() if name in ema_weights)
    # Validation scored the average: the dev loss of last/'s weights is the one it logged.
    model, _, config = load_for_inference(averaged, "last")
    task = TranslationTask(config, data_dir, Manifest.read(data_dir))
    loss = task.validate(model, torch.device("cpu"), torch.float32)["loss"]
    logged = CheckpointInfo.read(averaged / "last").state.last_valid
    assert loss == logged["loss"]


def test_a_resumed_run_continues_the_average_exactly(data_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(_config(data_dir, straight, ema_decay=0.9), progress=False)
    train(_config(data_dir, resumed, ema_decay=0.9, max_steps=STEPS // 2), progress=False)
    train(_config(data_dir, resumed, ema_decay=0.9), resume=True, progress=False)
    for name in ("last", "best"):
        expected, got = _weights(straight, name), _weights(resumed, name)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    expected, got = _trained(straight), _trained(resumed)
    assert expected.keys() == got.keys() and expected
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_ema_decay_out_of_range_is_refused():
    with pytest.raises(ConfigError, match="ema_decay"):
        config_from_dict({"train": {"ema_decay": 1.0}})


def test_training_updates_the_average_once_per_update_with_its_number(data_dir, tmp_path, monkeypatch):
    steps = []
    update = WeightAverage.update
    monkeypatch.setattr(WeightAverage, "update", lambda self, model, step: steps.append(step) or update(self, model, step))
    train(_config(data_dir, tmp_path / "run", ema_decay=0.9, max_steps=5), progress=False)
    assert steps == [1, 2, 3, 4, 5]  # the decay's warm-up counts updates from 1, as the formula's test does


def test_trained_weights_of_another_shape_are_refused(tmp_path):
    """Trained weights of another shape are refused, even a broadcastable one."""
    from nmt.ema import load_trained_weights, trained_weights
    from nmt.errors import CheckpointError

    model = torch.nn.Linear(3, 2)
    weights = trained_weights(model)
    weights["weight"] = torch.zeros(1, 3)  # (1, 3) broadcasts into (2, 3): copy_ alone would not complain
    with pytest.raises(CheckpointError, match="do not match the model .first: weight"):
        load_trained_weights(model, weights, tmp_path)
    assert not torch.equal(model.weight, torch.zeros(2, 3))
