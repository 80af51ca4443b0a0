"""`nmt train`: token-bucketed batches, AdamW with inverse-square-root warmup, label smoothing,
mixed precision, periodic validation (loss and BLEU), best/last checkpoints and exact resume.
Its setup, and the one loop every task runs: translation (`nmt.translation_task`) and
masked-LM pretraining (`nmt.pretrain`)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from nmt.batches import Batch, BatchPrefetcher
from nmt.checkpoint import (
    check_outside_data_dir,
    check_pretrained,
    check_resumed_task,
    check_same_model,
    checkpoint_dir,
    drop_replaced,
    has_checkpoint,
    has_config,
    has_set_aside_model,
    load_training_state,
    prune_update_checkpoints,
    read_config,
    read_training_info,
    recover_checkpoints,
    restore_replaced,
    save_checkpoint,
    set_aside_replaced,
    training_lock,
    update_checkpoint_name,
    write_config,
)
from nmt.config import Config, TrainConfig
from nmt.devices import (
    autocast,
    grad_scaler,
    keep_freed_memory,
    resolve_device,
    resolve_precision,
    slow_precision_note,
)
from nmt.distributed import Launch, Ranks, init_ranks, rank_device, start_processes
from nmt.ema import WeightAverage, load_trained_weights, trained_weights
from nmt.errors import CheckpointError, ConfigError, DataError, first_line
from nmt.files import TRANSLATION, CheckpointInfo, Manifest, TrainState, VocabInfo
from nmt.interfaces import TrainingBatch, TrainingTask
from nmt.multilingual import changed_weights
from nmt.paths import same_place
from nmt.train_log import TrainLog
from nmt.translation_task import MultilingualTranslationTask, TranslationTask, translation_loss

TOO_MANY_SKIPPED = "skipped updates"
SIGNALLED = "signal"  # a validation a stop signal cut short: every process stops at this update
VALIDATION_STOPS = ("", "patience", "target_bleu", SIGNALLED)


class StopRequested(BaseException):
    """A stop signal arrived in a `StopSignal.interrupting` block (not an Exception, which a
    handler of errors on the way might take for one)."""


class StopSignal:
    """Ctrl-C (SIGINT) and SIGTERM ask training to stop after the current update, which is then
    saved as `last/`, instead of killing it mid-step; in an `interrupting` block (a validation,
    which may take minutes a supervisor does not wait), they stop it at once."""

    # A signal again within this many seconds is the same stop delivered twice (a batch system
    # signals every process, and torchrun passes it on too), not a second Ctrl-C.
    SAME_STOP_SECONDS = 1.0

    def __init__(self):
        self.received = ""
        self.received_at = 0.0
        self._interrupting = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received and time.monotonic() - self.received_at < self.SAME_STOP_SECONDS:
            return
        if self.received:  # a second signal stops at once, as the caller's own handler would
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        self.received, self.received_at = signal.Signals(signum).name, time.monotonic()
        if self._interrupting:
            raise StopRequested(self.received)

    @contextlib.contextmanager
    def interrupting(self):
        """A block that a stop signal ends (StopRequested) where it is, rather than after it; it
        does not start once a signal has come."""
        if self.received:
            raise StopRequested(self.received)
        self._interrupting = True
        try:
            yield
        finally:
            self._interrupting = False

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class TrainResult:
    save_dir: Path
    steps: int
    epochs: float
    best_score: float  # the best dev score: BLEU for translation
    best_step: int
    last_valid: dict
    seconds: float
    stop_reason: str
    main_process: bool = True  # False in the other processes of a data-parallel run, and in the one that started them
    metric_name: str = "BLEU"
    exit_code: int = 0  # of torchrun, in the process that started the others (`Launch`)


def signal_stop_reason(name: str) -> str:
    """The stop reason of a run that a signal stopped, e.g. "signal (SIGTERM)"."""
    return f"signal ({name})"


def stopping_signal(stop_reason: str) -> signal.Signals | None:
    """The signal that stopped a run with this stop reason; None if it stopped otherwise."""
    match = re.fullmatch(r"signal \((\w+)\)", stop_reason)
    return signal.Signals[match.group(1)] if match else None


def inverse_sqrt_lr(step: int, peak: float, warmup: int, min_lr: float = 0.0) -> float:
    """Linear warmup to `peak` over `warmup` updates, then peak·sqrt(warmup/step); without
    warmup, `peak` throughout (the formula would give 0)."""
    if warmup <= 0:
        return peak
    if step < warmup:
        return peak * step / warmup
    return max(min_lr, peak * math.sqrt(warmup / step))


def decaying_lr(step: int, peak: float, warmup: int, total: int, min_lr: float = 0.0, shape: str = "linear") -> float:
    """Linear warmup to `peak` over `warmup` updates, then a linear or cosine decay that reaches
    `min_lr` at update `total` (a budget known in advance) and stays there."""
    if step < warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))  # 0 at the peak, 1 at the end
    remaining = 1.0 - progress if shape == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr + (peak - min_lr) * remaining


def scheduled_lr(step: int, tc: TrainConfig) -> float:
    """The learning rate of update `step` (counted from 1) under `tc.lr_schedule`."""
    if tc.lr_schedule == "inverse_sqrt":
        return inverse_sqrt_lr(step, tc.lr, tc.warmup_steps, tc.min_lr)
    return decaying_lr(step, tc.lr, tc.warmup_steps, tc.max_steps, tc.min_lr, tc.lr_schedule)


def make_optimizer(model: torch.nn.Module, tc: TrainConfig, fused: bool = True):
    """AdamW; by default its fused kernel (one pass over all parameters, on GPUs and CPUs alike)."""
    return torch.optim.AdamW(
        model.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay, fused=fused
    )


def compile_model(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """The model's forward compiled by torch.compile, once for the varying batch shapes of
    training. Turns torch's duck shapes off for the whole process (see below)."""
    import torch.fx.experimental._config as fx_config

    # torch.compile gives sizes that are equal in the first batch one symbol ("duck shapes"): a
    # first batch with as many source as target positions would tie the two, and the first batch
    # where they differ would compile forward and backward all over again. (An older torch lacks
    # the setting: it compiles that once more.)
    if hasattr(fx_config, "use_duck_shape"):
        fx_config.use_duck_shape = False
    return torch.compile(model, dynamic=True, backend=backend)


class UpdateResult(NamedTuple):
    """What one update did, as tensors left on the device (reading them waits for a GPU)."""

    loss: torch.Tensor  # () the summed label-smoothed loss; 0 when it was not finite
    skipped: torch.Tensor  # () bool: the weights were left as they were
    loss_finite: torch.Tensor  # () bool: `loss` is the update's loss (its tokens count in the logged mean)


def training_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    group: list[TrainingBatch],
    tc: TrainConfig,
    lr: float,
    device: torch.device,
    dtype: torch.dtype,
    normalizer: float | None = None,
    compute_loss: Callable | None = None,
    frozen: list[torch.nn.Parameter] | None = None,
    data_parallel: bool = False,
) -> UpdateResult:
    """One optimizer update from the gradients of `group`'s batches added up (accumulation).

    `compute_loss(model, batch, label_smoothing)` gives a batch's summed loss (by default the
    translation loss); the parameters in `frozen` are left as they are.

    The summed loss is divided by `normalizer`, by default the group's target tokens, so that
    the update follows the mean loss per token. With `data_parallel` (`model` is, or compiles, a
    DistributedDataParallel) gradients are averaged over processes: there, `normalizer` is the
    update's target tokens over all processes divided by their number.

    An update whose loss or gradient norm is not finite is skipped. Returns the summed
    label-smoothed loss (0 when not finite), whether the update was skipped and whether the loss
    was finite, as tensors left on the device: reading them would wait for the GPU, so the
    caller decides when.
    """
    normalizer = normalizer or sum(b.num_tgt_tokens for b in group)
    compute_loss = compute_loss or translation_loss
    total = torch.zeros((), device=device)
    for i, batch in enumerate(group):
        # Processes exchange gradients once per update: after the group's last batch.
        exchange = not data_parallel or i == len(group) - 1
        with contextlib.nullcontext() if exchange else model.no_sync():
            with autocast(device, dtype):
                loss = compute_loss(model, batch, tc.label_smoothing)
            total += loss.detach()
            scaled = loss / normalizer
            (scaler.scale(scaled) if scaler else scaled).backward()
    for param in frozen or ():
        param.grad = None  # the optimizer passes over parameters without a gradient
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    if scaler:
        scaler.unscale_(optimizer)
    # The norm is needed even without clipping, to see non-finite gradients.
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_norm if tc.clip_norm > 0 else float("inf"))
    # With data parallelism gradients, hence the norm, are the same in every process; losses are not.
    skipped = ~torch.isfinite(norm) if data_parallel else ~(torch.isfinite(total) & torch.isfinite(norm))
    step_unless_skipped(optimizer, scaler, skipped)
    optimizer.zero_grad(set_to_none=True)
    finite = torch.isfinite(total)
    return UpdateResult(torch.where(finite, total, torch.zeros_like(total)), skipped, finite)


def step_unless_skipped(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, skipped: torch.Tensor) -> None:
    """The optimizer step, left out when `skipped` (a device tensor) says so."""
    if scaler:
        # Loss scaling (fp16, or a GPU's cuDNN RNN): the scaler skips an update whose gradients
        # overflowed and lowers the loss scale.
        # A few in a row are routine while it finds its scale; a long run means a diverged model,
        # so the caller counts them as skipped updates too.
        scaler.step(optimizer)
        scaler.update()
    elif optimizer.defaults.get("fused"):
        # Fused AdamW takes the decision as a tensor (found_inf, as GradScaler gives it) and skips
        # on the device: no host sync.
        optimizer.found_inf = skipped.float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bool(skipped):
        optimizer.step()


def train(
    config: Config,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: tqdm.write(message, file=sys.stderr),
    launch: Launch | None = None,
) -> TrainResult:
    """Train a model as `config` says, writing checkpoints into `config.save_dir`; or, with a
    `launch` of several processes, start them, each running that command line."""
    started = time.time()
    config, manifest = training_setup(config, resume)
    if launch is not None and launch.starts_processes:
        return launched_run(config, launch, resume, overwrite, started)
    task_type = MultilingualTranslationTask if manifest.multilingual else TranslationTask
    data_dir, save_dir = Path(config.data_dir), Path(config.save_dir)
    return run_training(
        lambda ranks: task_type(config, data_dir, manifest), config, save_dir, resume, overwrite, progress, log, started
    )


def training_setup(config: Config, resume: bool) -> tuple[Config, Manifest]:
    """The run's config, completed (a resumed run's init, a multilingual data dir's temperature),
    and its data dir's manifest, checked before anything is loaded, and before torchrun starts
    processes that would each print the refusal."""
    if not config.data_dir:
        raise ConfigError("no data dir: set data_dir in the config or pass --data")
    if not config.save_dir:
        raise ConfigError("no checkpoint dir: set save_dir in the config or pass --out")
    data_dir, save_dir = Path(config.data_dir), Path(config.save_dir)
    check_outside_data_dir(save_dir, data_dir)
    manifest = Manifest.read(data_dir)
    if manifest.kind != "parallel":
        raise DataError(f"{data_dir} is a {manifest.kind} data dir, for nmt pretrain --data; translation needs parallel data")
    if config.model.share_embeddings and not manifest.vocab.joint:  # equal sizes would let it through
        raise ConfigError(f"model.share_embeddings needs a joint vocabulary, but {data_dir} has separate source and "
                          "target ones (nmt prepare --separate-vocab); set model.share_embeddings=false")
    if resume:
        check_resumed_task(save_dir, TRANSLATION)
        config = with_saved_init(config, save_dir)
    else:
        check_init(config, manifest)
    for key in ("direction_weights", "lang_temperature"):
        if getattr(config.train, key) and not manifest.multilingual:
            raise ConfigError(f"train.{key} needs a multilingual data dir (nmt prepare --directions); {data_dir} has one direction")
    if manifest.multilingual and not config.train.lang_temperature:  # the data dir's, written with the run for --resume
        config = dataclasses.replace(config, train=dataclasses.replace(
            config.train, lang_temperature=manifest.lang_temperature or 1.0))
    return config, manifest


def with_saved_init(config: Config, save_dir: Path) -> Config:
    """A resumed run without --init goes on from the model it began with (train.init of its
    config): the weights it holds fixed for train.freeze_init_steps are that model's."""
    if not has_config(save_dir):
        return config
    saved = read_config(save_dir).train
    if config.train.init and not (saved.init and same_place(config.train.init, saved.init)):
        began = f"from {saved.init}" if saved.init else "from scratch"
        raise ConfigError(f"the run in {save_dir} began {began}; --resume goes on from its own weights: leave out "
                          f"--init (and train.init) or give {saved.init or 'none'}")
    return dataclasses.replace(config, train=dataclasses.replace(config.train, init=saved.init, init_decoder=saved.init_decoder))


def check_init(config: Config, manifest: Manifest) -> None:
    """A wrong model to start from (train.init) fails now, not after loading the data. (A resumed
    run has its own weights and needs that model no more: see `check_resumable`.)"""
    init, tc, defaults = config.train.init, config.train, TrainConfig()
    # What each setting does to a masked LM's weights: nothing to a model given none, or a translation model's.
    doing = {"freeze_init_steps": "holds a masked LM's weights fixed",
             "init_decoder": "leaves a masked LM's weights out of the decoder"}
    changed = [key for key in doing if getattr(tc, key) != getattr(defaults, key)]
    if not init:
        if changed:
            raise ConfigError(f"train.{changed[0]} is about the weights of --init, and none is given")
        return
    task = check_pretrained(Path(init), manifest.vocab, config.model, tc.init_decoder).task
    if task == TRANSLATION and changed:
        key = changed[0]
        raise ConfigError(f"train.{key} {doing[key]}, but --init {init} is a translation model, every weight of which "
                          f"it loads; leave it at {str(getattr(defaults, key)).lower()}")


def run_training(
    make_task: Callable[[Ranks], TrainingTask], config: Config, save_dir: Path, resume: bool, overwrite: bool, progress: bool,
    log: Callable[[str], None], started: float,
) -> TrainResult:
    """The training loop, for any task (translation, masked-LM pretraining); `make_task(ranks)`
    builds it, once the checkpoint dir is known to be usable."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    if config.train.init and not resume and Path(config.train.init).resolve() == save_dir.resolve():
        raise ConfigError(f"--init {config.train.init} is the --out directory: training would replace the model it "
                          "starts from; choose another --out")
    ranks = init_ranks(config.train.device)
    try:
        with training_lock(save_dir) if ranks.is_main else contextlib.nullcontext():
            result = _train(make_task, config, ranks, save_dir, resume, overwrite, progress, log, started)
        # All processes leave together: gloo aborts a process whose group is torn down while
        # another is still writing its last checkpoint. (After a failure, torchrun stops the rest.)
        ranks.barrier()
        return result
    finally:
        ranks.close()


def _train(
    make_task: Callable[[Ranks], TrainingTask], config: Config, ranks: Ranks, save_dir: Path, resume: bool, overwrite: bool,
    progress: bool, log: Callable[[str], None], started: float,
) -> TrainResult:
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    if not ranks.is_main:  # one process writes the log and checkpoints, and validates
        log, progress = (lambda message: None), False
    if ranks.is_main and restore_replaced(save_dir):
        log(f"note: an --overwrite run stopped before its first checkpoint: {save_dir} holds the model it was replacing again")
    task = open_save_dir(make_task, ranks, save_dir, resume, overwrite)
    trainer = Trainer(task, config, ranks, save_dir, log, started)  # the device and precision checked first
    try:
        trainer.start(resume, overwrite)
        return trainer.run(progress)
    except BaseException:
        if ranks.is_main and restore_replaced(save_dir):  # stopped before its first checkpoint
            log(f"{save_dir} holds the model that --overwrite was to replace again")
        raise


def open_save_dir(
    make_task: Callable[[Ranks], TrainingTask], ranks: Ranks, save_dir: Path, resume: bool, overwrite: bool
) -> TrainingTask:
    """Check that `save_dir` may be trained into as asked; returns the task, built once the
    directory is known to be usable."""
    if ranks.is_main:
        recover_checkpoints(save_dir)
    ranks.barrier()
    check_save_dir(save_dir, resume, overwrite)
    task = make_task(ranks)
    if resume:
        task.check_resumable(save_dir)
        check_same_batches(save_dir, task.config, ranks.world)
    ranks.barrier()  # every process has looked before the main one clears anything
    return task


def check_save_dir(save_dir: Path, resume: bool, overwrite: bool) -> None:
    """`save_dir` may be trained into as asked: new or empty, a model to --resume, or one to
    --overwrite; never a folder of the user's."""
    # Hidden names are nmt's own (.lock, a save moved aside); a data dir is pretrain --text's.
    others = [p.name for p in save_dir.iterdir() if not p.name.startswith(".") and not (p / Manifest.NAME).is_file()] \
        if save_dir.is_dir() else []
    # vocab.json, not config.yaml, tells a model's: a config of the user's may be kept in a folder
    if others and not (save_dir / VocabInfo.NAME).is_file():
        raise CheckpointError(f"{save_dir} holds files but no model (no {VocabInfo.NAME}); train into a new or empty --out")
    exists = has_checkpoint(save_dir) or has_set_aside_model(save_dir)  # given back before the run starts
    if exists and not resume and not overwrite:
        raise CheckpointError(
            f"{save_dir} already holds a model; pass --resume to continue it or --overwrite to start again"
        )
    if resume and not exists:
        raise CheckpointError(f"nothing to resume: {save_dir} holds no checkpoint")


def launched_run(config: Config, launch: Launch, resume: bool, overwrite: bool, started: float) -> TrainResult:
    """Start the processes of a data-parallel run and wait for them; they report the run."""
    check_before_launch(config, launch.devices, resume, overwrite)
    code = start_processes(launch.devices, launch.command_line, config.train.device)
    return TrainResult(Path(config.save_dir), 0, 0.0, 0.0, 0, {}, time.time() - started, "", main_process=False, exit_code=code)


def check_before_launch(config: Config, processes: int, resume: bool, overwrite: bool) -> None:
    """What refuses a run of several processes before torchrun starts them (each of them would
    print the refusal, among torchrun's own lines), besides the command's own input checks: a
    checkpoint dir that may not be trained into as asked, and resuming another model, with
    other batch settings or another number of processes."""
    save_dir = Path(config.save_dir)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    check_save_dir(save_dir, resume, overwrite)
    if resume and processes >= 1 and has_config(save_dir):
        check_same_model(save_dir, config)
        check_same_batches(save_dir, config, processes)


def check_same_batches(save_dir: Path, config: Config, processes: int) -> None:
    """--resume continues the saved run's list of batches and random states: the settings that
    make them must be the saved run's."""
    saved = read_config(save_dir).train
    for key in ("batch_tokens", "accum_steps", "seed", "lang_temperature", "direction_weights"):
        old, new = getattr(saved, key), getattr(config.train, key)
        if key == "direction_weights":
            old, new = changed_weights(old), changed_weights(new)
        if key == "lang_temperature" and not old:  # a run from before the temperature in use was saved
            continue
        if old != new:
            raise ConfigError(
                f"train.{key} is {new!r} but the run in {save_dir} was trained with {old!r}; "
                "--resume needs the same value (or start a new run)"
            )
    old_processes = read_training_info(save_dir).processes
    if old_processes is not None and old_processes != processes:
        raise ConfigError(
            f"the run in {save_dir} was trained with {old_processes} process(es), this one has {processes}; "
            "--resume needs the same number"
        )


def process_shares(tc: TrainConfig, world: int) -> tuple[int, int]:
    """Each process's batches per update and tokens per batch. An update takes `accum_steps`
    batches of `batch_tokens` whatever the number of processes: they share them out, and when
    they cannot, each takes one batch of the same share of tokens."""
    if world == 1 or tc.accum_steps % world == 0:
        return tc.accum_steps // world, tc.batch_tokens
    return 1, max(1, tc.batch_tokens * tc.accum_steps // world)


def update_groups(batches: list[np.ndarray], per_update: int, several_processes: bool) -> list[list[np.ndarray]]:
    """An epoch's batches as updates of `per_update` batches. Every process builds the same list
    and takes its share of each; with several, a last update too small to share is left out."""
    last_start = len(batches) - per_update + 1 if several_processes else len(batches)
    groups = [batches[i : i + per_update] for i in range(0, max(last_start, 0), per_update)]
    if not groups:  # else every epoch would pass without an update, and the run never end
        raise ConfigError(
            f"the training data makes {len(batches)} batch(es) an epoch, fewer than one update takes ({per_update}: "
            "train.accum_steps shared by the processes); lower train.batch_tokens or train.accum_steps, or use fewer processes"
        )
    return groups


def validation_stop(tc: TrainConfig, metric: str, score: float, bad_validations: int) -> str:
    """Why training stops after a validation, or ""."""
    if tc.target_bleu and metric == "bleu" and score >= tc.target_bleu:
        return "target_bleu"
    if tc.patience and bad_validations >= tc.patience:
        return "patience"
    return ""


def with_saved_best(state: TrainState, save_dir: Path) -> TrainState:
    """A run stopped between saving best/ and last/ (a full disk: last/ is the larger, or a kill)
    left a best/ better than last/ knows: the resumed run replaces it only with a better one."""
    best = checkpoint_dir(save_dir, "best")
    if best is None:
        return state
    saved = CheckpointInfo.read(best).state
    if saved.best_score <= state.best_score:
        return state
    return dataclasses.replace(state, best_score=saved.best_score, best_step=saved.best_step)


def random_states(device: torch.device, ranks: Ranks) -> dict[str, torch.Tensor]:
    """The random generators' states; with several processes, every process's (a collective call)."""
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    if ranks.active:
        rng = {f"{kind}.rank{r}": state for kind in list(rng) for r, state in enumerate(ranks.gather(rng[kind].cpu()))}
    return rng


def restore_random_states(rng: dict[str, torch.Tensor], device: torch.device, ranks: Ranks) -> None:
    suffix = f".rank{ranks.rank}" if ranks.active else ""
    if f"cpu{suffix}" in rng:
        torch.set_rng_state(rng[f"cpu{suffix}"])
    if device.type == "cuda" and f"cuda{suffix}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda{suffix}"], device)


@dataclass
class Interval:
    """What the updates since the last log step add up to. Losses and skips stay device tensors,
    read once per log step (reading them waits for the GPU)."""

    device: torch.device
    started: float = field(default_factory=time.time)
    updates: int = 0
    tgt_tokens: int = 0
    src_tokens: int = 0
    wait_seconds: float = 0.0  # waiting for batches (built ahead in a thread on a GPU)

    def __post_init__(self) -> None:
        self.loss = torch.zeros((), device=self.device)  # summed loss of the updates with a finite one
        self.loss_tokens = torch.zeros((), dtype=torch.long, device=self.device)  # their target tokens
        self.skipped = torch.zeros((), dtype=torch.long, device=self.device)

    def add(self, result: UpdateResult, group: list[Batch]) -> None:
        tokens = sum(b.num_tgt_tokens for b in group)
        self.updates += 1
        self.loss += result.loss
        self.loss_tokens += result.loss_finite.long() * tokens
        self.skipped += result.skipped
        self.tgt_tokens += tokens
        self.src_tokens += sum(b.num_src_tokens for b in group)

    def record(self, step: int, epoch: float, lr: float, ranks: Ranks) -> dict:
        """The log record of the interval, over all processes: the loss is the mean per target
        token of the updates whose loss was finite; throughput counts every update's tokens."""
        # Reading the device tensors waits for the GPU's queued work, which the interval's time must include.
        values = [float(self.loss), int(self.loss_tokens), self.tgt_tokens, self.src_tokens, int(self.skipped)]
        seconds = max(time.time() - self.started, 1e-9)
        loss_sum, loss_tokens, tgt_tokens, src_tokens, skipped = ranks.sum(values, self.device)
        record = {
            "type": "train", "step": step, "epoch": epoch,
            "loss": round(loss_sum / loss_tokens, 4) if loss_tokens else None, "lr": lr,  # None (null): all skipped
            "tgt_tokens_per_s": round(tgt_tokens / seconds),
            "tokens_per_s": round((tgt_tokens + src_tokens) / seconds),
            "batch_wait_fraction": round(self.wait_seconds / seconds, 4),
        }
        skipped = int(skipped) // ranks.world  # every process skips the same updates
        if skipped:
            record["skipped_updates"] = skipped
        return record


class Trainer:
    """One run of the training loop for a task (translation, masked LM): the model, optimizer and
    `TrainState`, and the loop's steps as small methods: start or resume, one update (with the
    out-of-memory retry and the torch.compile fallback), the log, validate and save, the stop
    decision."""

    def __init__(self, task: TrainingTask, config: Config, ranks: Ranks, save_dir: Path, log: Callable[[str], None], started: float):
        tc = self.tc = config.train
        self.task, self.config, self.ranks, self.save_dir, self.log, self.started = task, config, ranks, save_dir, log, started
        self.device = rank_device(ranks, resolve_device(tc.device))
        self.dtype = resolve_precision(tc.precision, self.device)
        if self.device.type == "cpu":
            keep_freed_memory()  # a tenth of a CPU update went to page faults
        self.state = TrainState()
        torch.manual_seed(tc.seed)  # the same initial weights in every process
        self.model = task.build_model()
        self.frozen: list[torch.nn.Parameter] = []
        self.ema: WeightAverage | None = None  # train.ema_decay
        self.optimizer: torch.optim.Optimizer | None = None
        self.rank_accum, self.rank_tokens = process_shares(tc, ranks.world)
        self.update_batches = self.rank_accum * ranks.world
        self.scaler = grad_scaler(self.model, self.device, self.dtype)
        self.lr = 0.0
        self.validated_at = -1
        self.skipped_run = torch.zeros((), dtype=torch.long, device=self.device)  # updates skipped in a row
        self.longest_skipped_run = torch.zeros((), dtype=torch.long, device=self.device)
        self.interval = Interval(self.device)
        self.train_log: TrainLog | None = None
        self.stop_signal: StopSignal | None = None
        self.plain_progress = False

    def start(self, resume: bool, overwrite: bool = False) -> None:
        """Load initial weights, build the optimizer and the data-parallel and compiled views of
        the model, then restore the saved run (--resume) or write the new directory's files
        (--overwrite: the old run's set aside first, until the new run saves; see REPLACED)."""
        tc, ranks, device = self.tc, self.ranks, self.device
        self.frozen = self.task.initialize(self.model, resume, self.log)
        self.model.to(device)
        if ranks.active:
            torch.manual_seed(tc.seed * 1_000_003 + ranks.rank)  # each process its own dropout
        self.optimizer = make_optimizer(self.model, tc)
        # Updates run through `step_model`; checkpoints save `model`, whose parameter names are plain.
        self.eager_model = self.model
        if ranks.active:
            self.eager_model = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.step_model = compile_model(self.eager_model) if tc.compile else self.eager_model
        saved = load_training_state(self.save_dir, self.model, self.optimizer) if resume else None
        if saved:
            self.state = with_saved_best(saved.info.state, self.save_dir)
            restore_random_states(saved.rng, device, ranks)
            if self.scaler and saved.info.loss_scale:  # else the scale starts high again and skips updates
                self.scaler.load_state_dict(saved.info.loss_scale)
            # A run stopped by a signal saved last/ unvalidated: its final validation is still to come.
            self.validated_at = self.state.last_valid.get("step", -1)
            self.log(f"resuming {self.save_dir} at step {self.state.step} (epoch {self.state.epoch + 1})")
            if ranks.is_main:  # the settings it goes on with (keep_last, say, which nmt average reads)
                write_config(self.config, self.save_dir)
        elif ranks.is_main:
            if overwrite:
                set_aside_replaced(self.save_dir)
            self.save_dir.mkdir(parents=True, exist_ok=True)
            self.task.init_save_dir(self.save_dir)
        # The model holds its first weights or those of last/ (the average, if it was kept).
        if tc.ema_decay:
            self.ema = WeightAverage(self.model, tc.ema_decay)
        if saved and saved.trained_weights:
            load_trained_weights(self.model, saved.trained_weights, self.save_dir / "last")
        params = sum(p.numel() for p in self.model.parameters())
        self.log(
            f"model: {self.config.model.arch}, {params / 1e6:.1f}M parameters; device {device}, "
            f"{str(self.dtype).replace('torch.', '')}; {self.task.describe()}"
            + (f"; weights averaged (ema_decay {tc.ema_decay})" if tc.ema_decay else "")
            + (f"; {ranks.world} processes, {self.rank_accum} batch(es) of {self.rank_tokens} tokens each per update"
               if ranks.active else "")
        )
        note = slow_precision_note(device, self.dtype)
        if note:
            self.log(note)
        self.train_log = TrainLog(self.save_dir, tc.tensorboard, self.log) if ranks.is_main else None

    def elapsed(self) -> float:
        """Seconds of training in this run, earlier processes of a resumed one included."""
        return self.state.seconds + time.time() - self.started

    def write_log(self, record: dict) -> None:
        if self.train_log:
            self.train_log.write(record)

    def save(self, name: str) -> None:
        """Every process calls this for `last` (its random state is saved too); only the main one writes."""
        rng = random_states(self.device, self.ranks) if name == "last" else None
        if not self.ranks.is_main:
            return
        state = dataclasses.replace(self.state, seconds=self.elapsed(), processes=self.ranks.world)
        last = name == "last"
        info = CheckpointInfo(state, self.task.metric, loss_scale=self.scaler.state_dict() if self.scaler and last else None)
        trained = trained_weights(self.model) if self.ema and last else None
        with self.averaged():
            save_checkpoint(self.save_dir, name, self.model, info, self.optimizer if last else None, rng, trained)
        drop_replaced(self.save_dir)

    def averaged(self):
        """A block in which the model holds the moving average of its weights, if one is kept."""
        return self.ema.swapped_in(self.model) if self.ema else contextlib.nullcontext()

    def run(self, progress: bool) -> TrainResult:
        """Epochs of updates until a stop; a final validation unless the last update had one."""
        st, tc = self.state, self.tc
        self.write_log({
            "type": "start", "step": st.step, "time": round(time.time(), 3),
            "setup_seconds": round(time.time() - self.started, 2),
        })
        self.model.train()
        self.interval = Interval(self.device)  # the first interval starts with the first update, not the set-up
        # A terminal gets a bar; a log file (CI, nohup) one plain line per log step instead of its frames.
        self.plain_progress = progress and not sys.stderr.isatty()
        bar = tqdm(total=tc.max_steps or None, initial=st.step, unit="step", disable=not progress or self.plain_progress,
                   file=sys.stderr, dynamic_ncols=True, desc="training")
        self.stop_signal = StopSignal()
        reason, groups = "", []
        stopped = self.resumed_validation_stop()
        try:
            if not stopped and st.step and st.step % tc.valid_every == 0 and self.validated_at != st.step:
                stopped = self.validate_and_save()  # a scheduled validation a signal cut short, made now
            while not reason:
                # The epoch's groups first, also where the run stops: its summary counts the epochs by them.
                groups = update_groups(self.task.epoch_batches(self.rank_tokens, st.epoch), self.update_batches, self.ranks.active)
                if tc.max_epochs and st.epoch >= tc.max_epochs:
                    reason = "max_epochs"
                    break
                if stopped:
                    reason = stopped
                    break
                if tc.max_steps and st.step >= tc.max_steps:  # a resumed run that had finished
                    reason = "max_steps"
                    break
                # A resumed run that had run out of time (the saved state: the same in every process).
                if tc.max_minutes and st.seconds >= tc.max_minutes * 60:
                    reason = "max_minutes"
                    break
                if not tc.max_steps and tc.max_epochs and bar.total is None:
                    bar.total = tc.max_epochs * len(groups)  # for the ETA; batch counts vary a little
                reason = self.run_epoch(groups, bar)
                if st.group_in_epoch >= len(groups):
                    st.epoch, st.group_in_epoch = st.epoch + 1, 0
            if self.interval.updates:  # a stop between log steps: the updates since the last one
                self.log_interval(bar, st.epoch + st.group_in_epoch / max(len(groups), 1))
            if self.validated_at != st.step:  # a stop between validations: one more, for best/ and the log
                self.validate_and_save(on_schedule=False)
        finally:
            self.stop_signal.restore()
            bar.close()
            if self.train_log:
                self.train_log.close()
        return TrainResult(
            save_dir=self.save_dir, steps=st.step, epochs=round(st.epoch + st.group_in_epoch / max(len(groups), 1), 2),
            best_score=st.best_score, best_step=st.best_step, metric_name=self.task.metric_name,
            last_valid=st.last_valid, seconds=round(self.elapsed(), 1), stop_reason=reason,
            main_process=self.ranks.is_main,
        )

    def resumed_validation_stop(self) -> str:
        """Why a resumed run's last validation stopped it (patience, target_bleu), or "". One made
        at a stop between two scheduled ones stops nothing, as it did not when it was made."""
        last, tc = self.state.last_valid, self.tc
        if self.task.metric not in last or last.get("step", 0) % tc.valid_every:
            return ""
        return validation_stop(tc, self.task.metric, last[self.task.metric], self.state.bad_validations)

    def run_epoch(self, groups: list[list[np.ndarray]], bar: tqdm) -> str:
        """The epoch's remaining updates; returns why training stops, or "" at the epoch's end."""
        st, epoch = self.state, self.state.epoch
        # On a GPU, the next updates' batches are built in a background thread while this one runs.
        ahead = 2 if self.device.type == "cuda" else 0
        build = lambda index: self.build_update(groups, epoch, index)  # noqa: E731
        with BatchPrefetcher(build, st.group_in_epoch, len(groups), ahead) as prefetcher:
            while st.group_in_epoch < len(groups):
                waiting_since = time.time()
                group = [batch.to(self.device) for batch in prefetcher.next()]
                self.interval.wait_seconds += time.time() - waiting_since
                result = self.update(group, groups[st.group_in_epoch])
                if self.ema:
                    self.ema.update(self.model, st.step)
                self.count(result, group)
                st.group_in_epoch += 1
                bar.update(1)
                if st.step % self.tc.log_every == 0:
                    self.log_interval(bar, epoch + st.group_in_epoch / len(groups))
                reason = self.stop_after_update()
                if reason:
                    return reason
        return ""

    def build_update(self, groups: list[list[np.ndarray]], epoch: int, index: int) -> list[Batch]:
        """This process's batches of update `index` (called from the prefetching thread)."""
        first = self.ranks.rank * self.rank_accum
        share = groups[index][first : first + self.rank_accum]
        pin = self.device.type == "cuda"
        batches = [
            self.task.make_batch(indices, pin, epoch, index * self.update_batches + first + i)
            for i, indices in enumerate(share)
        ]
        self.task.release_pages()  # resident memory must not grow with the corpus
        return batches

    def frozen_now(self) -> list[torch.nn.Parameter]:
        return self.frozen if self.state.step <= self.tc.freeze_init_steps else []

    def apply(self, group: list[Batch], lr: float, normalizer: float | None) -> UpdateResult:
        return training_update(self.step_model, self.optimizer, self.scaler, group, self.tc, lr, self.device,
                               self.dtype, normalizer, self.task.loss, self.frozen_now(), self.ranks.active)

    def update(self, group: list[Batch], update: list[np.ndarray]) -> UpdateResult:
        """One update: its normalizer, the learning rate, then the out-of-memory retry or the
        fall back to eager mode if torch.compile fails."""
        normalizer = None
        if self.ranks.active:  # the update's target tokens in all processes, per process
            update_tokens = self.task.update_tokens(update)
            if update_tokens is None:  # known only once the batches are built: ask the others
                (update_tokens,) = self.ranks.sum([sum(b.num_tgt_tokens for b in group)], self.device)
            normalizer = update_tokens / self.ranks.world
        self.state.step += 1
        self.lr = scheduled_lr(self.state.step, self.tc)
        failure = ""
        try:
            return self.apply(group, self.lr, normalizer)
        except torch.OutOfMemoryError:
            failure = "out of memory"
        except Exception as e:  # torch.compile fails at the first call, if at all
            if self.step_model is self.eager_model:
                raise
            failure = f"{type(e).__name__}: {first_line(e)}"
        # Retries run outside the except blocks: there, the failed attempt's tensors are freed.
        if failure == "out of memory":
            return self.retry_out_of_memory(group, self.lr, normalizer)
        self.log(f"warning: torch.compile failed ({failure}); training continues without it")
        self.step_model = self.eager_model
        self.optimizer.zero_grad(set_to_none=True)
        return self.apply(group, self.lr, normalizer)

    def retry_out_of_memory(self, group: list[Batch], lr: float, normalizer: float | None) -> UpdateResult:
        """After running out of memory on `group`: the same update from half-size batches, with
        the same normalizer, or none if that fails too (counted as a skipped update). With
        several processes the others are already exchanging gradients and cannot retry with
        this one: training stops with an error (torchrun then stops the others)."""
        step = self.state.step
        if self.ranks.active:
            raise ConfigError(
                f"out of memory at step {step} in process {self.ranks.rank} of {self.ranks.world}: the half-batch "
                "retry runs with one process only; lower train.batch_tokens and continue with --resume "
                "(the last checkpoint is intact)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            with contextlib.suppress(AssertionError, RuntimeError):
                self.scaler.update()  # forget the failed attempt's unscale_, if it got that far
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        halves = [half for batch in group for half in batch.halves()]
        try:
            result = self.apply(halves, lr, normalizer)
            self.log(f"warning: out of memory at step {step}; the update was made from half-size batches")
            return result
        except torch.OutOfMemoryError:
            self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        sizes = "+".join(str(b.src.shape[0]) for b in group)
        self.log(f"warning: out of memory at step {step} even with half-size batches; skipped {sizes} sentences")
        no = torch.zeros((), dtype=torch.bool, device=self.device)
        return UpdateResult(torch.zeros((), device=self.device), ~no, no)

    def count(self, result: UpdateResult, group: list[Batch]) -> None:
        self.interval.add(result, group)
        self.skipped_run = (self.skipped_run + 1) * result.skipped  # on the device: no wait
        self.longest_skipped_run = torch.maximum(self.longest_skipped_run, self.skipped_run)

    def log_interval(self, bar: tqdm, epoch: float) -> None:
        tc = self.tc
        record = self.interval.record(self.state.step, epoch, self.lr, self.ranks)
        if "skipped_updates" in record:
            cause = "gradient overflow under loss scaling (scale lowered) or non-finite loss" if self.scaler else "non-finite loss or gradient"
            self.log(f"warning: {record['skipped_updates']} update(s) up to step {self.state.step} skipped: {cause}")
        self.write_log(record)
        loss = "-" if record["loss"] is None else f"{record['loss']:.3f}"
        postfix = {"loss": loss, "lr": f"{self.lr:.2e}", "tok/s": record[self.task.throughput]}
        if tc.max_minutes and not tc.max_steps:
            postfix["left"] = f"{max(tc.max_minutes - self.elapsed() / 60, 0):.1f}min"
        bar.set_postfix(postfix)
        if self.plain_progress:
            of = f"/{tc.max_steps}" if tc.max_steps else ""
            self.log(f"step {self.state.step}{of}: " + ", ".join(f"{key} {value}" for key, value in postfix.items()))
        self.interval = Interval(self.device)

    def stop_after_update(self) -> str:
        """Why training stops after this update, or "": too many skipped updates, a validation's
        verdict, a signal, the clock or the step limit."""
        st, tc, ranks = self.state, self.tc, self.ranks
        # Reading the count waits for the GPU: there, only at log steps.
        if tc.max_skipped_updates and (self.device.type != "cuda" or st.step % tc.log_every == 0):
            if int(self.longest_skipped_run) >= tc.max_skipped_updates:
                self.log(
                    f"error: {int(self.longest_skipped_run)} updates in a row were skipped (non-finite loss or "
                    f"gradient, or out of memory); stopping at step {st.step} with the weights of the last "
                    "good update. A lower train.lr, more train.warmup_steps or a smaller train.batch_tokens may help."
                )
                return TOO_MANY_SKIPPED
        if st.step % tc.valid_every == 0:
            reason = self.validate_and_save()
            if reason:
                return reason
        # Signals and the clock differ between processes: with several, they decide together at
        # log steps, so that all stop at the same update.
        if not ranks.active or st.step % tc.log_every == 0:
            if ranks.agree(int(bool(self.stop_signal.received)), self.device):
                return self.stopped_by_signal()
            out_of_time = tc.max_minutes and self.elapsed() >= tc.max_minutes * 60
            if ranks.agree(int(bool(out_of_time)), self.device):
                return "max_minutes"
        if tc.max_steps and st.step >= tc.max_steps:
            return "max_steps"
        return ""

    def stopped_by_signal(self) -> str:
        """Save last/ (unless validating this update did) and say how to go on."""
        name = self.stop_signal.received if self.stop_signal and self.stop_signal.received else "SIGTERM"
        if self.validated_at != self.state.step:
            self.check_finite_weights()
            self.save("last")
            self.validated_at = self.state.step  # saved; no final validation on the way out
        self.log(f"stopped by {name} at step {self.state.step}; continue with --resume")
        return signal_stop_reason(name)

    def check_finite_weights(self) -> None:
        """A finite loss and gradient can still take a step too large for the weights (an absurd
        learning rate): such weights are never saved over the last good ones."""
        if not bool(torch.stack([p.isfinite().all() for p in self.model.parameters()]).all()):
            raise ConfigError(f"training diverged: the weights are no longer finite at step {self.state.step} "
                              f"(lower train.lr); nothing is saved over what {self.save_dir} held")

    def validated(self) -> bool:
        """Validate the model (its moving average, if kept) into state.last_valid; False when a
        stop signal cut the validation short (the weights are the trained ones again)."""
        started, training, grad = time.time(), self.model.training, torch.is_grad_enabled()
        interrupting = self.stop_signal.interrupting() if self.stop_signal else contextlib.nullcontext()
        try:
            with self.averaged(), interrupting:  # the trained weights come back with no signal cutting that short
                valid = self.task.validate(self.model, self.device, self.dtype)
        except StopRequested as stop:  # raised where validating was: put back what it may have left changed
            self.model.train(training)
            torch.set_grad_enabled(grad)
            torch.set_autocast_enabled(self.device.type, False)
            self.log(f"step {self.state.step}: validation stopped by {stop}")
            return False
        finally:
            self.state.valid_seconds += time.time() - started
        self.state.last_valid = {"step": self.state.step, **valid}
        return True

    def validate_and_save(self, on_schedule: bool = True) -> str:
        """Validate (main process) and save checkpoints; returns why training should stop, or "".
        A validation off the train.valid_every schedule (at a stop between two) may give best/,
        but counts for neither patience nor the kept update checkpoints, so that a run resumed
        with a larger budget goes on as if it had not stopped."""
        st, task = self.state, self.task
        self.validated_at = st.step
        reason = ""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the queued updates' time belongs to the interval, not here
        began = time.time()
        self.check_finite_weights()
        validated = self.ranks.is_main and self.validated()
        if self.ranks.is_main and not validated:  # a signal cut it short
            reason = SIGNALLED
        seconds = self.elapsed()  # before saving: the time to quality leaves out the writing
        saving_started = time.time()
        if validated:
            score = st.last_valid[task.metric]
            improved = score > st.best_score
            if improved:
                st.best_score, st.best_step = score, st.step
                self.save("best")
            if on_schedule:
                st.bad_validations = 0 if score > st.patience_score else st.bad_validations + 1
                st.patience_score = max(st.patience_score, score)
            # train_seconds leaves out validating and saving: the time to reach a dev BLEU, as
            # benchmarks count it
            self.write_log({  # the record names its score, for the log's readers (nmt plot, nmt average)
                "type": "valid", **st.last_valid, "metric": task.metric, "metric_name": task.metric_name, "seconds": round(seconds, 1),
                "train_seconds": round(seconds - st.valid_seconds, 1), **({} if on_schedule else {"scheduled": False}),
            })
            self.log(
                f"step {st.step}: dev loss {st.last_valid['loss']:.3f}, ppl {st.last_valid['ppl']:.2f}"
                + "".join(f", {key} {st.last_valid[key]:.2f}" for key in task.extra_metrics)
                + f", {task.metric_name} {st.last_valid[task.metric]:.2f}"
                + (" (best)" if improved else f" (best {st.best_score:.2f} at {st.best_step})")
            )
            reason = validation_stop(self.tc, task.metric, st.last_valid[task.metric], st.bad_validations)
            if on_schedule and (self.tc.keep_last or self.tc.keep_best):
                self.save(update_checkpoint_name(st.step))
                prune_update_checkpoints(self.save_dir, self.tc.keep_last, self.tc.keep_best)
        self.save("last")
        if self.ranks.is_main:
            st.valid_seconds += time.time() - saving_started
        verdict = VALIDATION_STOPS[self.ranks.agree(VALIDATION_STOPS.index(reason), self.device)]
        self.interval.started += time.time() - began  # the logged throughput counts training only
        return self.stopped_by_signal() if verdict == SIGNALLED else verdict
