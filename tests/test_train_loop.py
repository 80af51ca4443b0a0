"""The pieces of the training loop, each without training a model, and its stops."""

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_TRANSFORMER, prepare_toy_data

import nmt.train
from nmt.batches import Batch
from nmt.config import TrainConfig, config_from_dict
from nmt.distributed import Ranks
from nmt.errors import CheckpointError, ConfigError, DataError
from nmt.files import CheckpointInfo, Manifest, TrainState
from nmt.train import Interval, Trainer, UpdateResult, process_shares, update_groups, validation_stop
from nmt.translation_task import TranslationTask

CPU = torch.device("cpu")


def _batch(sentences: int, tgt_tokens: int) -> Batch:
    src = torch.full((sentences, 3), 5)
    tgt = torch.full((sentences, 4), 6)
    return Batch(src, tgt, tgt, num_tgt_tokens=tgt_tokens, num_src_tokens=sentences * 3)


def _result(loss: float, skipped: bool, finite: bool) -> UpdateResult:
    return UpdateResult(torch.tensor(loss), torch.tensor(skipped), torch.tensor(finite))


def test_stop_after_a_validation():
    tc = TrainConfig(target_bleu=30.0, patience=3)
    assert validation_stop(tc, "bleu", 30.0, 0) == "target_bleu"
    assert validation_stop(tc, "bleu", 29.9, 2) == ""
    assert validation_stop(tc, "bleu", 29.9, 3) == "patience"
    assert validation_stop(tc, "accuracy", 99.0, 0) == ""  # target_bleu is for BLEU only
    assert validation_stop(TrainConfig(), "bleu", 99.0, 100) == ""  # both off by default


def test_processes_share_out_each_update():
    assert process_shares(TrainConfig(batch_tokens=1000, accum_steps=4), 1) == (4, 1000)
    assert process_shares(TrainConfig(batch_tokens=1000, accum_steps=4), 2) == (2, 1000)
    assert process_shares(TrainConfig(batch_tokens=1000, accum_steps=3), 2) == (1, 1500)  # same tokens in all
    batches = [[i] for i in range(7)]
    assert update_groups(batches, 2, several_processes=False) == [[[0], [1]], [[2], [3]], [[4], [5]], [[6]]]
    assert update_groups(batches, 2, several_processes=True) == [[[0], [1]], [[2], [3]], [[4], [5]]]
    # an epoch too small for one update would loop without end: refused
    for too_few, several in (([[0]], True), ([], False)):
        with pytest.raises(ConfigError, match=f"makes {len(too_few)} batch.es. an epoch, fewer than one update takes .2") as error:
            update_groups(too_few, 2, several_processes=several)
        assert len(str(error.value).splitlines()) == 1


def test_logged_loss_leaves_out_updates_whose_loss_was_not_finite():
    interval = Interval(CPU)
    interval.add(_result(20.0, False, True), [_batch(2, 10)])
    interval.add(_result(0.0, True, False), [_batch(2, 30)])  # non-finite loss: skipped, counted as 0
    interval.add(_result(12.0, True, True), [_batch(1, 6)])  # fp16 overflow: skipped, its loss is real
    record = interval.record(step=3, epoch=0.5, lr=1e-3, ranks=Ranks())
    assert record["loss"] == pytest.approx(32.0 / 16)  # not 32 / 46
    assert record["skipped_updates"] == 2
    assert record["tgt_tokens_per_s"] > 0 and 0 <= record["batch_wait_fraction"] <= 1


def _trainer_stub(world: int, apply):
    optimizer = SimpleNamespace(zero_grad=lambda set_to_none: None)
    return SimpleNamespace(
        ranks=Ranks(rank=0, world=world), state=TrainState(step=7), optimizer=optimizer, scaler=None, device=CPU,
        apply=apply, log=lambda message: None,
    )


def test_out_of_memory_retry_keeps_the_normalizer():
    calls = []

    def apply(group, lr, normalizer):
        calls.append((len(group), [b.src.shape[0] for b in group], normalizer))
        return _result(5.0, False, True)

    stub = _trainer_stub(1, apply)
    result = Trainer.retry_out_of_memory(stub, [_batch(4, 16), _batch(2, 8)], 1e-3, 12.5)
    assert calls == [(4, [2, 2, 1, 1], 12.5)] and not bool(result.skipped)

    def apply_out_of_memory(group, lr, normalizer):
        raise torch.OutOfMemoryError("CUDA out of memory")

    result = Trainer.retry_out_of_memory(_trainer_stub(1, apply_out_of_memory), [_batch(4, 16)], 1e-3, None)
    assert bool(result.skipped) and not bool(result.loss_finite)


def test_out_of_memory_with_several_processes_stops_with_one_line():
    stub = _trainer_stub(2, lambda *args: pytest.fail("no retry with several processes"))
    with pytest.raises(ConfigError, match="out of memory at step 7 in process 0 of 2") as error:
        Trainer.retry_out_of_memory(stub, [_batch(4, 16)], 1e-3, 8.0)
    assert len(str(error.value).splitlines()) == 1 and "batch_tokens" in str(error.value)


def test_updates_of_several_processes_exchange_gradients_as_data_parallel_ones(monkeypatch):
    """Told by the trainer, not guessed from the model: a compiled DistributedDataParallel is
    no DistributedDataParallel instance."""
    seen = []
    monkeypatch.setattr(nmt.train, "training_update", lambda *args: seen.append(args[-1]))
    for world in (1, 2):
        stub = SimpleNamespace(step_model=None, optimizer=None, scaler=None, tc=None, device=CPU, dtype=torch.float32,
                               task=SimpleNamespace(loss=None), frozen_now=lambda: [], ranks=Ranks(rank=0, world=world))
        Trainer.apply(stub, [], 1e-3, None)
    assert seen == [False, True]


def test_train_state_round_trips_through_info_json(tmp_path):
    state = TrainState(step=12, epoch=1, group_in_epoch=3, best_score=31.5, best_step=10, bad_validations=1,
                       patience_score=31.0, seconds=40.04, valid_seconds=2.25, last_valid={"step": 12, "bleu": 30.0}, processes=2)
    CheckpointInfo(state, "bleu", sha256={"model.safetensors": "ab"}).write(tmp_path)
    restored = CheckpointInfo.read(tmp_path)
    assert restored.state == TrainState(**{**vars(state), "seconds": 40.0, "valid_seconds": 2.2})
    assert restored.metric == "bleu" and restored.sha256 == {"model.safetensors": "ab"} and restored.param_groups is None


def test_files_written_by_earlier_versions_are_read(tmp_path):
    import json

    from nmt.files import CheckpointInfo, Manifest

    vocab = {"joint": True, "src_model": "spm.joint.model", "tgt_model": "spm.joint.model", "src_size": 40,
             "tgt_size": 40, "src_sha256": "a", "tgt_sha256": "a"}
    old_manifest = {"src_lang": "de", "tgt_lang": "en", "vocab": vocab, "counts": {}, "filters": {"normalization": "NFKC"},
                    "something_newer": 1}
    (tmp_path / "manifest.json").write_text(json.dumps(old_manifest))
    manifest = Manifest.read(tmp_path)
    assert manifest.normalization["src"]["unicode_form"] == "NFKC" and manifest.vocab.src_size == 40
    (tmp_path / "info.json").write_text(json.dumps({"step": 5, "epoch": 0, "group_in_epoch": 5, "best_bleu": 12.0,
                                                    "best_step": 5, "bad_validations": 0, "seconds": 9.0}))
    info = CheckpointInfo.read(tmp_path)
    assert info.state.best_score == info.state.patience_score == 12.0  # patience counted from the best
    assert info.state.processes is None and info.metric == "bleu"
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(Exception, match="damaged"):
        Manifest.read(tmp_path)


@pytest.mark.parametrize("damage", [
    {"vocab": ["spm.joint.model"]}, {"vocab": "spm.joint.model"}, {"normalization": "NFX"},
    {"normalization": {"src": {"unicode_form": "NFX"}, "tgt": {}}}, {"normalization": {"src": {}}},
    {"normalization": {"src": {}, "tgt": {"chinese_script": "klingon"}}},
    {"counts": [1]}, {"directions": "en-es"}, {"src_lang": 5},
    {"vocab": {"joint": True, "src_model": None, "tgt_model": "spm.joint.model", "src_size": 40, "tgt_size": 40,
               "src_sha256": "a", "tgt_sha256": "a"}},
])
def test_a_hand_edited_manifest_is_refused_in_one_line(tmp_path, damage):
    """Not a traceback when read, nor one at the first validation, which normalizes with it."""
    import json

    from nmt.files import Manifest

    vocab = {"joint": True, "src_model": "spm.joint.model", "tgt_model": "spm.joint.model", "src_size": 40,
             "tgt_size": 40, "src_sha256": "a", "tgt_sha256": "a"}
    manifest = {"src_lang": "de", "tgt_lang": "en", "vocab": vocab, "counts": {}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert Manifest.read(tmp_path).target_normalization().unicode_form == "NFC"
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, **damage}))
    with pytest.raises(DataError, match="damaged or from another version"):
        Manifest.read(tmp_path)


@pytest.mark.parametrize("damage", [{"sha256": None}, {"param_groups": [5, 6]}, {"param_groups": 5},
                                    {"last_valid": [1]}, {"step": "7"}, {"step": True}, {"loss_scale": 2.0}])
def test_a_hand_edited_info_json_is_refused_in_one_line(tmp_path, damage):
    CheckpointInfo(TrainState(step=7), "bleu").write(tmp_path)
    data = {**json.loads((tmp_path / "info.json").read_text()), **damage}
    (tmp_path / "info.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="damaged or from another version"):
        CheckpointInfo.read(tmp_path)


def _stopping_stub(step: int, elapsed: float = 0.0, skipped_run: int = 0, signal: str = "", verdict: str = "",
                   validated_at: int = -1, **tc):
    calls = []
    stub = SimpleNamespace(
        state=TrainState(step=step), tc=TrainConfig(**{"log_every": 10, "valid_every": 1000, **tc}), ranks=Ranks(),
        device=CPU, longest_skipped_run=torch.tensor(skipped_run), stop_signal=SimpleNamespace(received=signal),
        elapsed=lambda: elapsed, log=lambda message: calls.append(("log", message)),
        save=lambda name: calls.append(("save", name)), check_finite_weights=lambda: None,
        validated_at=validated_at,
    )

    def validate_and_save():  # saves last/, as the trainer's does
        stub.validated_at = step
        calls.extend([("validate", step), ("save", "last")])
        return verdict

    stub.validate_and_save = validate_and_save
    stub.stopped_by_signal = lambda: Trainer.stopped_by_signal(stub)
    return stub, calls


def test_stop_decision_after_an_update():
    def stop(*args, **kwargs):
        stub, calls = _stopping_stub(*args, **kwargs)
        return Trainer.stop_after_update(stub), calls

    assert stop(7)[0] == ""
    assert stop(8, max_steps=8)[0] == "max_steps" and stop(7, max_steps=8)[0] == ""
    assert stop(7, elapsed=61.0, max_minutes=1.0)[0] == "max_minutes" and stop(7, elapsed=59.0, max_minutes=1.0)[0] == ""
    reason, calls = stop(7, skipped_run=20)
    assert reason == "skipped updates" and calls[0][0] == "log" and "20 updates in a row" in calls[0][1]
    reason, calls = stop(7, signal="SIGTERM")
    assert reason == "signal (SIGTERM)" and ("save", "last") in calls
    reason, calls = stop(10, valid_every=5, verdict="patience")
    assert reason == "patience" and ("validate", 10) in calls
    reason, calls = stop(10, valid_every=5, signal="SIGINT")  # the signal came while validating
    assert reason == "signal (SIGINT)" and calls.count(("save", "last")) == 1, calls
    assert stop(11, valid_every=5, verdict="patience")[1] == []  # no validation between


def test_time_to_quality_leaves_out_validating_and_saving(monkeypatch):
    """train_seconds counts only training: not validation, and not the checkpoints written
    after an earlier validation."""
    clock = [10.0]  # 10 s of training before the first validation

    def advance(seconds):
        clock[0] += seconds

    monkeypatch.setattr(nmt.train, "time", SimpleNamespace(time=lambda: clock[0]))
    logged = []
    task = SimpleNamespace(validate=lambda model, device, dtype: advance(1.0) or {"loss": 1.0, "ppl": 2.7, "bleu": 20.0},
                           metric="bleu", metric_name="BLEU", extra_metrics=())
    stub = SimpleNamespace(
        state=TrainState(step=100), task=task, tc=TrainConfig(), ranks=Ranks(), model=torch.nn.Linear(1, 1), device=CPU, dtype=None,
        averaged=contextlib.nullcontext, elapsed=lambda: clock[0], save=lambda name: advance(5.0),
        write_log=logged.append, log=lambda message: None, validated_at=0, check_finite_weights=lambda: None,
        interval=Interval(CPU, started=0.0), stop_signal=None,  # training began at 0 s
    )
    stub.validated = lambda: Trainer.validated(stub)
    stub.interval.add(_result(30.0, False, True), [_batch(10, 100)])  # 100 target tokens in the 10 s
    Trainer.validate_and_save(stub)
    advance(10.0)  # 10 s more of training
    Trainer.validate_and_save(stub)
    assert [record["train_seconds"] for record in logged] == [10.0, 20.0]
    # nor does the throughput logged next: 100 tokens in 20 s of training, not in the 32 s gone by
    assert stub.interval.record(100, 1.0, 1e-3, Ranks())["tgt_tokens_per_s"] == 5


def _padded_batches() -> list[Batch]:
    """Two batches of other sentence and token counts, with padding: a loss per sentence or per
    batch would weigh them otherwise than per token."""
    first = Batch(torch.tensor([[5, 6, 7, 3], [8, 9, 3, 0]]), torch.tensor([[1, 10, 11, 12], [1, 13, 0, 0]]),
                  torch.tensor([[10, 11, 12, 3], [13, 3, 0, 0]]), num_tgt_tokens=6, num_src_tokens=7)
    second = Batch(torch.tensor([[5, 3]]), torch.tensor([[1, 14]]), torch.tensor([[14, 3]]), num_tgt_tokens=2, num_src_tokens=2)
    return [first, second]


def _gradients_of_one_update(tc: TrainConfig) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The gradients an update hands its optimizer (after clipping), and the model."""
    from conftest import TINY_TRANSFORMER

    from nmt.config import ModelConfig
    from nmt.models import build_model
    from nmt.train import training_update

    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY_TRANSFORMER), 20, 20)
    seen = {}
    optimizer = SimpleNamespace(param_groups=[{}], defaults={}, zero_grad=lambda set_to_none: None,
                                step=lambda: seen.update({n: p.grad.clone() for n, p in model.named_parameters()}))
    training_update(model, optimizer, None, _padded_batches(), tc, 1e-3, CPU, torch.float32)
    return model, seen


def test_an_update_follows_the_mean_label_smoothed_loss_per_target_token():
    """The loss written out by hand: per token, (1 - e) * -log p(target) + e * mean over the
    vocabulary of -log p, padding left out, summed over both batches and divided by their 8
    target tokens."""
    smoothing = 0.1
    model, gradients = _gradients_of_one_update(TrainConfig(label_smoothing=smoothing, clip_norm=0.0))
    model.zero_grad(set_to_none=True)
    total = 0.0
    for batch in _padded_batches():
        log_probs = model(batch.src, batch.tgt_in).log_softmax(-1)  # (B, T, V)
        real = batch.tgt_out != 0
        target = -log_probs.gather(-1, batch.tgt_out[..., None])[..., 0]
        per_token = (1 - smoothing) * target - smoothing * log_probs.mean(-1)
        total = total + per_token[real].sum()
    (total / 8).backward()
    for name, param in model.named_parameters():
        assert torch.allclose(gradients[name], param.grad, atol=1e-6), name


def test_an_update_clips_the_gradient_norm():
    _, unclipped = _gradients_of_one_update(TrainConfig(clip_norm=0.0))
    _, clipped = _gradients_of_one_update(TrainConfig(clip_norm=0.01))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in unclipped.values()]))
    assert norm > 0.01
    for name, gradient in unclipped.items():
        assert torch.allclose(clipped[name], gradient * (0.01 / norm), atol=1e-7), name


@pytest.mark.parametrize("fused", [True, False])
def test_a_skipped_update_leaves_the_weights_and_the_optimizer_state(fused):
    """The fused optimizer is told to skip through a device tensor (torch's `found_inf`, which
    spares a host sync per update); the plain one by a branch. Either way nothing moves."""
    from nmt.train import make_optimizer, step_unless_skipped

    model = torch.nn.Linear(3, 2)
    optimizer = make_optimizer(model, TrainConfig(), fused=fused)
    assert bool(optimizer.defaults.get("fused")) == fused  # else every update syncs
    for skipped, moves in ((torch.tensor(True), False), (torch.tensor(False), True)):
        before = [p.detach().clone() for p in model.parameters()]
        model(torch.ones(1, 3)).sum().backward()
        step_unless_skipped(optimizer, None, skipped)
        optimizer.zero_grad(set_to_none=True)
        changed = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        assert changed == moves
    assert not hasattr(optimizer, "found_inf")


def test_best_follows_the_highest_dev_score_and_patience_counts_from_it():
    scores = iter([20.0, 30.0, 25.0, 30.0, 31.0])
    saved = []
    task = SimpleNamespace(validate=lambda model, device, dtype: {"loss": 1.0, "ppl": 2.7, "bleu": next(scores)},
                           metric="bleu", metric_name="BLEU", extra_metrics=())
    stub = SimpleNamespace(
        state=TrainState(), task=task, tc=TrainConfig(), ranks=Ranks(), model=torch.nn.Linear(1, 1), device=CPU, dtype=None,
        averaged=contextlib.nullcontext, elapsed=lambda: 1.0, save=saved.append, write_log=lambda record: None,
        log=lambda message: None, validated_at=0, check_finite_weights=lambda: None, interval=Interval(CPU), stop_signal=None,
    )
    stub.validated = lambda: Trainer.validated(stub)
    history = []
    for step in (100, 200, 300, 400, 500):
        stub.state.step = step
        Trainer.validate_and_save(stub)
        history.append((stub.state.best_step, stub.state.bad_validations))
    assert history == [(100, 0), (200, 0), (200, 1), (200, 2), (500, 0)]  # a tie does not move best/
    assert [name for name in saved if name == "best"] == ["best"] * 3


def test_an_interrupting_block_ends_at_a_signal_and_only_inside_it():
    import signal

    from nmt.train import StopRequested, StopSignal

    stop = StopSignal()
    try:
        with stop.interrupting():
            pass
        stop._handle(signal.SIGTERM, None)  # after the block: noted, training stops after its update
        assert stop.received == "SIGTERM"
        with pytest.raises(StopRequested), stop.interrupting():  # a stop already asked for: not begun
            pytest.fail("the block began")
    finally:
        stop.restore()
    other = StopSignal()
    try:
        with pytest.raises(StopRequested), other.interrupting():
            other._handle(signal.SIGINT, None)
            pytest.fail("the block went on")
    finally:
        other.restore()


def test_a_validation_cut_short_stops_every_process_at_this_update():
    """The main process alone validates: its cut-short validation is the verdict all of them
    agree on, not a signal the others would weigh only at the next log step."""
    saved = []
    stub = SimpleNamespace(
        state=TrainState(step=3), tc=TrainConfig(), device=CPU, validated_at=0, interval=Interval(CPU),
        ranks=SimpleNamespace(is_main=True, agree=lambda code, device: code), validated=lambda: False,
        check_finite_weights=lambda: None, elapsed=lambda: 1.0, save=saved.append, log=lambda message: None,
        stop_signal=SimpleNamespace(received="SIGINT"), task=None,
    )
    stub.stopped_by_signal = lambda: Trainer.stopped_by_signal(stub)
    assert Trainer.validate_and_save(stub) == "signal (SIGINT)" and saved == ["last"]


def test_a_stop_another_process_asked_for_is_named_sigterm(monkeypatch):
    """torchrun passes a signal on to the other processes; one that did not see it itself stops
    as if it had been sent SIGTERM."""
    stub, calls = _stopping_stub(8, validated_at=8)
    assert Trainer.stopped_by_signal(stub) == "signal (SIGTERM)" and ("save", "last") not in calls


def test_a_second_signal_during_training_goes_to_the_handler_training_replaced():
    import os
    import signal

    from nmt.train import StopSignal

    class Caught(Exception):
        pass

    def callers_handler(signum, frame):
        raise Caught

    previous_term = signal.signal(signal.SIGTERM, callers_handler)
    try:
        stop = StopSignal()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == "SIGTERM"  # the first asks training to stop after its update
        os.kill(os.getpid(), signal.SIGTERM)  # the same stop again at once (a batch system and torchrun both)
        stop.received_at -= StopSignal.SAME_STOP_SECONDS  # a second later: a second Ctrl-C
        try:
            with pytest.raises(Caught):
                os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:
            pytest.fail("the second signal raised KeyboardInterrupt instead of going to the caller's handler")
        stop.restore()
        assert signal.getsignal(signal.SIGTERM) is callers_handler
    finally:
        signal.signal(signal.SIGTERM, previous_term)


def test_compiling_for_training_traces_once_for_every_batch_shape(monkeypatch):
    """Batches whose source and target lengths are equal, then differ: one graph for all, with
    dropout inside it on the CPU too (torch's "eager" backend traces as torch.compile does,
    without generating code)."""
    import torch._dynamo
    import torch.fx.experimental._config as fx_config
    from conftest import TINY_TRANSFORMER
    from torch._dynamo.utils import counters

    from nmt.config import ModelConfig
    from nmt.models import build_model
    from nmt.train import compile_model

    if hasattr(fx_config, "use_duck_shape"):  # torch's default, put back after the test (an older torch lacks it)
        monkeypatch.setattr(fx_config, "use_duck_shape", True)
    torch._dynamo.reset()
    counters.clear()
    compiled = compile_model(build_model(ModelConfig(**{**TINY_TRANSFORMER, "dropout": 0.1}), 30, 30), backend="eager")
    for B, S, T in ((2, 5, 5), (2, 7, 9), (3, 4, 6), (5, 8, 3)):
        compiled(torch.randint(4, 30, (B, S)), torch.randint(4, 30, (B, T))).sum().backward()
    assert counters["stats"]["unique_graphs"] == (1 if hasattr(fx_config, "use_duck_shape") else 2)
    torch._dynamo.reset()


def _task(tmp_path, data_dir, **train):
    config = config_from_dict({"data_dir": str(data_dir), "save_dir": str(tmp_path / "m"), "model": TINY_TRANSFORMER,
                               "train": {"batch_tokens": 60, **train}})
    return TranslationTask(config, data_dir, Manifest.read(data_dir))


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return prepare_toy_data(tmp_path_factory.mktemp("toy"), train=60)


def test_update_tokens_are_the_target_tokens_of_the_batches_built(toy_data, tmp_path):
    """The distributed normalizer counts each sentence's EOS, as the built batches do."""
    task = _task(tmp_path, toy_data)
    update = task.epoch_batches(60, 1)[:3]
    built = [task.make_batch(indices, False, 1, number) for number, indices in enumerate(update)]
    assert task.update_tokens(update) == sum(batch.num_tgt_tokens for batch in built)


def test_each_epoch_draws_other_batches_and_the_same_epoch_the_same(toy_data, tmp_path):
    """Each epoch has batches of its own, and an epoch's batches are the same on every call."""
    task = _task(tmp_path, toy_data, seed=1)
    one, again, two = (task.epoch_batches(60, epoch) for epoch in (1, 1, 2))
    one, again, two = ([b.tolist() for b in batches] for batches in (one, again, two))
    assert one == again and one != two
    assert sorted(sum(one, [])) == sorted(sum(two, []))  # both the whole split


# --- the steps of an update, one by one ------------------------------------------------------

def test_without_warmup_the_inverse_square_root_schedule_keeps_its_peak():
    from nmt.train import inverse_sqrt_lr

    assert [inverse_sqrt_lr(step, 1e-3, 0) for step in (1, 10, 1000)] == [1e-3] * 3


def test_one_non_finite_tensor_is_divergence_and_never_saved():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with torch.no_grad():
        model[1].bias[0] = float("nan")
    with pytest.raises(ConfigError, match="diverged"):
        Trainer.check_finite_weights(SimpleNamespace(model=model, state=SimpleNamespace(step=3), save_dir="run"))


def test_processes_exchange_gradients_once_with_the_last_batch_of_an_update():
    """Accumulating batches in DistributedDataParallel: every backward but the last runs under
    no_sync, so the gradients are summed over processes once per update."""
    synced, exchanging = [False], []

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        @contextlib.contextmanager
        def no_sync(self):
            synced[0] = True
            try:
                yield
            finally:
                synced[0] = False

    def loss(model, batch, label_smoothing):
        exchanging.append(not synced[0])
        return model.w * 2

    model = Model()
    batches = [SimpleNamespace(num_tgt_tokens=2) for _ in range(3)]
    nmt.train.training_update(model, torch.optim.AdamW(model.parameters()), None, batches, TrainConfig(), 1e-3,
                              torch.device("cpu"), torch.float32, 6.0, loss, None, True)
    assert exchanging == [False, False, True]


def test_each_process_divides_its_loss_by_its_share_of_the_updates_tokens():
    """DistributedDataParallel averages gradients over processes: each process divides by the
    update's target tokens over the number of processes, so that the average is per token."""
    normalizers = []
    trainer = SimpleNamespace(ranks=Ranks(rank=0, world=2), task=SimpleNamespace(update_tokens=lambda update: 16),
                              state=SimpleNamespace(step=0), tc=TrainConfig(warmup_steps=10),
                              apply=lambda group, lr, normalizer: normalizers.append(normalizer))
    Trainer.update(trainer, [], [])
    assert normalizers == [8.0]


def test_a_damaged_line_inside_the_training_log_is_an_error_not_its_end(tmp_path):
    from nmt.train_log import read_train_log

    record = {"type": "train", "step": 1, "loss": 1.0, "lr": 1e-3}
    lines = [json.dumps(record), '{"type": "tra', json.dumps({**record, "step": 2})]
    (tmp_path / "train_log.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 2: not a JSON record"):
        read_train_log(tmp_path)
