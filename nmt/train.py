"""`nmt train`: token-bucketed batches, AdamW with inverse-square-root warmup, label smoothing,
mixed precision, periodic validation (loss and BLEU), best/last checkpoints and exact resume."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from nmt.checkpoint import (
    check_pretrained,
    has_checkpoint,
    init_save_dir,
    load_pretrained,
    load_training_state,
    read_config,
    read_vocab_info,
    recover_checkpoints,
    save_checkpoint,
    training_lock,
)
from nmt.config import Config, TrainConfig
from nmt.batches import Batch, BatchPrefetcher, make_batch, token_batches
from nmt.data import ParallelSplit, read_lines, read_manifest
from nmt.devices import autocast, resolve_device, resolve_precision
from nmt.distributed import Ranks, init_ranks, rank_device
from nmt.errors import CheckpointError, ConfigError, first_line
from nmt.evaluate import bleu_tokenizer, corpus_bleu
from nmt.models import build_model
from nmt.tokenizer import PAD, Tokenizer
from nmt.train_log import LOG_NAME, TENSORBOARD_DIR, TrainLog
from nmt.translate import translate_ids


TOO_MANY_SKIPPED = "skipped updates"
VALIDATION_STOPS = ("", "patience", "target_bleu")


class StopSignal:
    """Ctrl-C (SIGINT) and SIGTERM ask training to stop after the current update, which is then
    saved as `last/`, instead of killing it mid-step."""

    def __init__(self):
        self.received = ""
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

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
    main_process: bool = True  # False in the other processes of a data-parallel run
    metric_name: str = "BLEU"


def inverse_sqrt_lr(step: int, peak: float, warmup: int, min_lr: float = 0.0) -> float:
    """Linear warmup to `peak` over `warmup` updates, then peak·sqrt(warmup/step)."""
    if warmup <= 0:
        return peak
    if step < warmup:
        return peak * step / warmup
    return max(min_lr, peak * math.sqrt(warmup / step))


def token_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Summed cross-entropy over non-pad target tokens. logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=PAD,
        label_smoothing=label_smoothing,
        reduction="sum",
    )


def translation_loss(model: torch.nn.Module, batch: Batch, label_smoothing: float) -> torch.Tensor:
    logits = model(batch.src, batch.tgt_in)  # (B, T, V)
    return token_loss(logits, batch.tgt_out, label_smoothing)


def make_optimizer(model: torch.nn.Module, tc: TrainConfig, device: torch.device, fused: bool | None = None):
    """AdamW; the fused CUDA kernel on GPUs (one launch for all parameters)."""
    return torch.optim.AdamW(
        model.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay,
        fused=(device.type == "cuda") if fused is None else fused,
    )


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model's forward compiled by torch.compile, for the varying batch shapes of training."""
    return torch.compile(model, dynamic=True)


def training_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    group: list[Batch],
    tc: TrainConfig,
    lr: float,
    device: torch.device,
    dtype: torch.dtype,
    normalizer: float | None = None,
    compute_loss: Callable | None = None,
    frozen: list[torch.nn.Parameter] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer update from the gradients of `group`'s batches added up (accumulation).

    `compute_loss(model, batch, label_smoothing)` gives a batch's summed loss (by default the
    translation loss); the parameters in `frozen` are left as they are.

    The summed loss is divided by `normalizer`, by default the group's target tokens, so that
    the update follows the mean loss per token. Under DistributedDataParallel (a model with
    `no_sync`) gradients are averaged over processes: there, `normalizer` is the update's target
    tokens over all processes divided by their number.

    An update whose loss or gradient norm is not finite is skipped. Returns the summed
    label-smoothed loss (0 when not finite) and whether the update was skipped, as tensors left
    on the device: reading them would wait for the GPU, so the caller decides when.
    """
    normalizer = normalizer or sum(b.num_tgt_tokens for b in group)
    compute_loss = compute_loss or translation_loss
    data_parallel = hasattr(model, "no_sync")
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
    if scaler:
        # fp16: the scaler skips an update whose gradients overflowed and lowers the loss scale.
        # A few in a row are routine while it finds its scale; a long run means a diverged model,
        # so they count as skipped updates too (after the exchange, the norm is the same everywhere).
        skipped = ~torch.isfinite(norm) if data_parallel else ~(torch.isfinite(total) & torch.isfinite(norm))
        scaler.step(optimizer)
        scaler.update()
    else:
        # With data parallelism gradients, hence the norm, are the same in every process; losses are not.
        skipped = ~torch.isfinite(norm) if data_parallel else ~(torch.isfinite(total) & torch.isfinite(norm))
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            # Fused AdamW takes the decision as a tensor and skips on the device: no host sync.
            optimizer.found_inf = skipped.float()
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
        elif not bool(skipped):
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return torch.where(torch.isfinite(total), total, torch.zeros_like(total)), skipped


@torch.no_grad()
def validate(
    model,
    split: ParallelSplit,
    references: list[str],
    tokenizer: Tokenizer,
    config: Config,
    device: torch.device,
    dtype: torch.dtype,
    tgt_lang: str | None = None,
) -> dict:
    """Dev loss (teacher forced, no smoothing) and BLEU of the decoded dev sources (tokenized for
    BLEU as the target language needs)."""
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for indices in token_batches(split.src.lengths, split.tgt.lengths, config.train.batch_tokens):
        batch = make_batch(split, indices).to(device)
        with autocast(device, dtype):
            logits = model(batch.src, batch.tgt_in)
        total_loss += float(token_loss(logits, batch.tgt_out, 0.0))
        total_tokens += batch.num_tgt_tokens
    count = len(split)
    if config.train.valid_max_sentences:
        count = min(count, config.train.valid_max_sentences)
    decode = dataclasses.replace(config.decode, beam=config.train.valid_beam, nbest=1)
    with autocast(device, dtype):
        hyps = translate_ids(model, [split.src[i] for i in range(count)], decode, device)
    texts = tokenizer.decode_tgt([nbest[0].tokens for nbest in hyps])
    model.train(was_training)
    loss = total_loss / max(total_tokens, 1)
    return {
        "loss": round(loss, 4),
        "ppl": round(math.exp(min(loss, 50.0)), 2),
        "bleu": round(corpus_bleu(texts, references[:count], bleu_tokenizer(tgt_lang)), 2),
        "sentences": count,
    }


class TranslationTask:
    """What the training loop needs to know about translation: the data, the model, the
    batches, the loss and how to validate. `nmt pretrain` gives the same loop a masked-LM task."""

    metric, metric_name = "bleu", "BLEU"  # the dev score that picks best/
    extra_metrics: tuple[str, ...] = ()  # other dev figures to print
    throughput = "tgt_tokens_per_s"  # the log figure the progress bar shows as tok/s

    def __init__(self, config: Config, data_dir: Path, manifest: dict):
        self.config, self.data_dir, self.manifest = config, data_dir, manifest
        self.tokenizer = Tokenizer(data_dir / manifest["vocab"]["src_model"], data_dir / manifest["vocab"]["tgt_model"])
        self.train_split = ParallelSplit.load(data_dir, "train")
        self.valid_split = ParallelSplit.load(data_dir, "valid")
        self.references = list(read_lines(data_dir / "valid.tgt.txt"))

    def describe(self) -> str:
        return f"{len(self.train_split)} training pairs"

    def build_model(self) -> torch.nn.Module:
        return build_model(self.config.model, self.tokenizer.src_vocab_size, self.tokenizer.tgt_vocab_size)

    def initialize(self, model: torch.nn.Module, resume: bool, log: Callable[[str], None]) -> list[torch.nn.Parameter]:
        """Load pretrained weights (train.init) unless resuming; returns the parameters to hold
        fixed for the first train.freeze_init_steps updates."""
        tc = self.config.train
        if not tc.init or (resume and not tc.freeze_init_steps):  # resuming needs only its own weights
            return []
        loaded = load_pretrained(model, Path(tc.init), self.manifest["vocab"], tc.init_decoder, copy=not resume)
        if not resume:
            fresh = [name for name, _ in model.named_parameters() if name not in loaded]
            log(f"initialised from {tc.init}: {len(loaded)} tensors loaded ({_summarize(loaded)}); "
                f"{len(fresh)} start fresh ({_summarize(fresh)})")
        if not tc.freeze_init_steps:
            return []
        return [param for name, param in model.named_parameters() if name in loaded]

    def epoch_batches(self, batch_tokens: int, epoch: int) -> list[np.ndarray]:
        split, tc = self.train_split, self.config.train
        return token_batches(split.src.lengths, split.tgt.lengths, batch_tokens, seed=tc.seed * 100_003 + epoch)

    def make_batch(self, indices: np.ndarray, pin_memory: bool, epoch: int, number: int) -> Batch:
        return make_batch(self.train_split, indices, pin_memory)

    def update_tokens(self, update: list[np.ndarray]) -> int | None:
        """Target tokens of an update's batches (+1 EOS each), known before building them."""
        return sum(len(b) + int(self.train_split.tgt.lengths[b].sum()) for b in update)

    def release_pages(self) -> None:
        self.train_split.release_pages()

    loss = staticmethod(translation_loss)

    def validate(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> dict:
        return validate(
            model, self.valid_split, self.references, self.tokenizer, self.config, device, dtype, self.manifest["tgt_lang"]
        )

    def check_resumable(self, save_dir: Path) -> None:
        check_same_model(save_dir, self.config)
        saved = read_vocab_info(save_dir)["vocab"]
        if (saved["src_sha256"], saved["tgt_sha256"]) != (self.manifest["vocab"]["src_sha256"], self.manifest["vocab"]["tgt_sha256"]):
            raise CheckpointError(
                f"the checkpoint in {save_dir} was trained with a different vocabulary than data dir {self.data_dir}"
            )

    def init_save_dir(self, save_dir: Path) -> None:
        init_save_dir(save_dir, self.config, self.data_dir, self.manifest)


def _summarize(names: list[str]) -> str:
    """Parameter names grouped by their first part: 'encoder_layers ×24, src_embed'."""
    counts: dict[str, int] = {}
    for name in names:
        counts[name.split(".")[0]] = counts.get(name.split(".")[0], 0) + 1
    return ", ".join(f"{k} ×{n}" if n > 1 else k for k, n in counts.items()) or "none"


def check_same_model(save_dir: Path, config: Config) -> None:
    saved = read_config(save_dir)
    if saved.model != config.model:
        for field in dataclasses.fields(saved.model):
            old, new = getattr(saved.model, field.name), getattr(config.model, field.name)
            if old != new:
                raise ConfigError(
                    f"model.{field.name} is {new!r} but the checkpoint in {save_dir} was built with {old!r}"
                )


def train(
    config: Config,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: tqdm.write(message, file=sys.stderr),
) -> TrainResult:
    """Train a model as `config` says, writing checkpoints into `config.save_dir`."""
    started = time.time()
    if not config.data_dir:
        raise ConfigError("no data dir: set data_dir in the config or pass --data")
    if not config.save_dir:
        raise ConfigError("no checkpoint dir: set save_dir in the config or pass --out")
    data_dir, save_dir = Path(config.data_dir), Path(config.save_dir)
    manifest = read_manifest(data_dir)
    if config.train.init and not resume:  # a wrong pretrained model fails now, not after loading the data
        check_pretrained(Path(config.train.init), manifest["vocab"], config.train.init_decoder)
    return run_training(
        lambda ranks: TranslationTask(config, data_dir, manifest), config, save_dir, resume, overwrite, progress, log, started
    )


def run_training(
    make_task: Callable, config: Config, save_dir: Path, resume: bool, overwrite: bool, progress: bool,
    log: Callable[[str], None], started: float,
) -> TrainResult:
    """The training loop, for any task (translation, masked-LM pretraining); `make_task(ranks)`
    builds it, once the checkpoint dir is known to be usable."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    ranks = init_ranks(config.train.device)
    try:
        with training_lock(save_dir) if ranks.is_main else contextlib.nullcontext():
            return _train(make_task, config, ranks, save_dir, resume, overwrite, progress, log, started)
    finally:
        ranks.close()


def _train(
    make_task: Callable, config: Config, ranks: Ranks, save_dir: Path, resume: bool, overwrite: bool,
    progress: bool, log: Callable[[str], None], started: float,
) -> TrainResult:
    tc = config.train
    device = rank_device(ranks, resolve_device(tc.device))
    dtype = resolve_precision(tc.precision, device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if not ranks.is_main:  # one process writes the log and checkpoints, and validates
        log, progress = (lambda message: None), False

    if ranks.is_main:
        recover_checkpoints(save_dir)
    ranks.barrier()
    exists = has_checkpoint(save_dir)
    if exists and not resume and not overwrite:
        raise CheckpointError(
            f"{save_dir} already holds a model; pass --resume to continue it or --overwrite to start again"
        )
    if resume and not exists:
        raise CheckpointError(f"nothing to resume: {save_dir} holds no checkpoint")
    task = make_task(ranks)
    if resume:
        task.check_resumable(save_dir)
    ranks.barrier()  # every process has looked before the main one clears anything
    if overwrite and ranks.is_main:
        for name in ("best", "last", LOG_NAME, TENSORBOARD_DIR):
            path = save_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    torch.manual_seed(tc.seed)  # the same initial weights in every process
    model = task.build_model()
    frozen = task.initialize(model, resume, log)
    model.to(device)
    if ranks.active:
        torch.manual_seed(tc.seed * 1_000_003 + ranks.rank)  # each process its own dropout
    optimizer = make_optimizer(model, tc, device)
    # Updates run through `step_model`; checkpoints save `model`, whose parameter names are plain.
    eager_model = model
    if ranks.active:
        eager_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step_model = compile_model(eager_model) if tc.compile else eager_model
    # Each update takes `accum_steps` batches of `batch_tokens`, whatever the number of processes:
    # they share them out. When they cannot, each takes one batch of the same share of tokens.
    rank_accum, rank_tokens = tc.accum_steps, tc.batch_tokens
    if ranks.active:
        if tc.accum_steps % ranks.world == 0:
            rank_accum = tc.accum_steps // ranks.world
        else:
            rank_accum, rank_tokens = 1, max(1, tc.batch_tokens * tc.accum_steps // ranks.world)
    update_batches = rank_accum * ranks.world
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    step, epoch, group_in_epoch = 0, 0, 0
    best_score, best_step, bad_validations, elapsed_before, valid_seconds = -1.0, 0, 0, 0.0, 0.0
    last_valid: dict = {}
    if resume:
        info, rng = load_training_state(save_dir, model, optimizer)
        step, epoch, group_in_epoch = info["step"], info["epoch"], info["group_in_epoch"]
        best_score, best_step = info.get("best_score", info.get("best_bleu", -1.0)), info["best_step"]
        bad_validations, elapsed_before = info["bad_validations"], info["seconds"]
        valid_seconds = info.get("valid_seconds", 0.0)
        last_valid = info.get("last_valid", {})
        suffix = f".rank{ranks.rank}" if ranks.active else ""
        if f"cpu{suffix}" in rng:
            torch.set_rng_state(rng[f"cpu{suffix}"])
        if device.type == "cuda" and f"cuda{suffix}" in rng:
            torch.cuda.set_rng_state(rng[f"cuda{suffix}"], device)
        log(f"resuming {save_dir} at step {step} (epoch {epoch + 1})")
    elif ranks.is_main:
        save_dir.mkdir(parents=True, exist_ok=True)
        task.init_save_dir(save_dir)

    params = sum(p.numel() for p in model.parameters())
    log(
        f"model: {config.model.arch}, {params / 1e6:.1f}M parameters; device {device}, "
        f"{str(dtype).replace('torch.', '')}; {task.describe()}"
        + (f"; {ranks.world} processes, {rank_accum} batch(es) of {rank_tokens} tokens each per update" if ranks.active else "")
    )
    train_log = TrainLog(save_dir, tc.tensorboard, log) if ranks.is_main else None

    def write_log(record: dict) -> None:
        if train_log:
            train_log.write(record)

    def save(name: str) -> None:
        """Every process calls this for `last` (its random state is saved too); only the main one writes."""
        rng = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        if ranks.active and name == "last":
            rng = {f"{kind}.rank{r}": state for kind in list(rng) for r, state in enumerate(ranks.gather(rng[kind].cpu()))}
        if not ranks.is_main:
            return
        info = {
            "step": step, "epoch": epoch, "group_in_epoch": group_in_epoch, "metric": task.metric, "best_score": best_score,
            "best_step": best_step, "bad_validations": bad_validations,
            "seconds": round(elapsed_before + time.time() - started, 1), "valid_seconds": round(valid_seconds, 1),
            "last_valid": last_valid,
        }
        if name == "last":
            save_checkpoint(save_dir, name, model, info, optimizer, rng)
        else:
            save_checkpoint(save_dir, name, model, info)

    def run_validation() -> str:
        """Validate (main process) and save checkpoints; returns why training should stop, or ""."""
        nonlocal best_score, best_step, bad_validations, last_valid, valid_seconds
        reason = ""
        if ranks.is_main:
            valid_started = time.time()
            last_valid = {"step": step, **task.validate(model, device, dtype)}
            valid_seconds += time.time() - valid_started
            seconds = elapsed_before + time.time() - started
            improved = last_valid[task.metric] > best_score
            if improved:
                best_score, best_step, bad_validations = last_valid[task.metric], step, 0
                save("best")
            else:
                bad_validations += 1
            # train_seconds leaves out validation: the time to reach a dev BLEU, as benchmarks count it
            write_log({
                "type": "valid", **last_valid, "seconds": round(seconds, 1),
                "train_seconds": round(seconds - valid_seconds, 1),
            })
            log(
                f"step {step}: dev loss {last_valid['loss']:.3f}, ppl {last_valid['ppl']:.2f}"
                + "".join(f", {key} {last_valid[key]:.2f}" for key in task.extra_metrics)
                + f", {task.metric_name} {last_valid[task.metric]:.2f}"
                + (" (best)" if improved else f" (best {best_score:.2f} at {best_step})")
            )
            if tc.target_bleu and task.metric == "bleu" and last_valid["bleu"] >= tc.target_bleu:
                reason = "target_bleu"
            elif tc.patience and bad_validations >= tc.patience:
                reason = "patience"
        save("last")
        return VALIDATION_STOPS[ranks.agree(VALIDATION_STOPS.index(reason), device)]

    def frozen_now() -> list[torch.nn.Parameter]:
        return frozen if step <= tc.freeze_init_steps else []

    def retry_out_of_memory(group: list[Batch], lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """After running out of memory on `group`: the same update from half-size batches, or
        none if that fails too (counted as a skipped update)."""
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            with contextlib.suppress(AssertionError, RuntimeError):
                scaler.update()  # forget the failed attempt's unscale_, if it got that far
        if device.type == "cuda":
            torch.cuda.empty_cache()
        halves = [half for batch in group for half in batch.halves()]
        try:
            loss, skipped = training_update(step_model, optimizer, scaler, halves, tc, lr, device, dtype,
                                            compute_loss=task.loss, frozen=frozen_now())
            log(f"warning: out of memory at step {step}; the update was made from half-size batches")
            return loss, skipped
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            if ranks.active:  # the other processes wait for this one's gradients: it cannot skip
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            sizes = "+".join(str(b.src.shape[0]) for b in group)
            log(f"warning: out of memory at step {step} even with half-size batches; skipped {sizes} sentences")
            return torch.zeros((), device=device), torch.ones((), dtype=torch.bool, device=device)

    # When training starts, by the clock (so that a benchmark can add the process start-up),
    # and how long setting up took: opening the data, building the model, restoring a run.
    write_log({
        "type": "start", "step": step, "time": round(time.time(), 3), "setup_seconds": round(time.time() - started, 2),
    })
    model.train()
    bar = tqdm(
        total=tc.max_steps or None, initial=step, unit="step", disable=not progress, file=sys.stderr,
        dynamic_ncols=True, desc="training",
    )
    interval_loss = torch.zeros((), device=device)
    interval_skipped = torch.zeros((), dtype=torch.long, device=device)
    skipped_run = torch.zeros((), dtype=torch.long, device=device)
    longest_skipped_run = torch.zeros((), dtype=torch.long, device=device)
    interval_tokens, interval_src_tokens, interval_start = 0, 0, time.time()
    interval_wait = 0.0  # seconds the loop waited for batches (built ahead in a thread on a GPU)
    stop_reason = ""
    groups: list = []
    validated_at = step if resume else -1
    pin = device.type == "cuda"
    stop_signal = StopSignal()
    try:
        while not stop_reason:
            if tc.max_epochs and epoch >= tc.max_epochs:
                stop_reason = "max_epochs"
                break
            batches = task.epoch_batches(rank_tokens, epoch)
            # Every process builds the same list of updates and takes its share of each; with
            # several processes, a last update too small to share is left out.
            last_start = len(batches) - update_batches + 1 if ranks.active else len(batches)
            groups = [batches[i : i + update_batches] for i in range(0, max(last_start, 0), update_batches)]
            if not tc.max_steps and tc.max_epochs and bar.total is None:
                bar.total = tc.max_epochs * len(groups)  # for the ETA; batch counts vary a little

            def build_update(index: int, groups=groups, epoch=epoch) -> list[Batch]:
                first = ranks.rank * rank_accum
                share = groups[index][first : first + rank_accum]
                batches = [
                    task.make_batch(indices, pin, epoch, index * update_batches + first + i)
                    for i, indices in enumerate(share)
                ]
                task.release_pages()  # resident memory must not grow with the corpus
                return batches

            # On a GPU, the next updates' batches are built in a background thread while this one runs.
            ahead = 2 if device.type == "cuda" else 0
            with BatchPrefetcher(build_update, group_in_epoch, len(groups), ahead) as prefetcher:
                while group_in_epoch < len(groups):
                    update = groups[group_in_epoch]
                    waiting_since = time.time()
                    group = [batch.to(device) for batch in prefetcher.next()]
                    interval_wait += time.time() - waiting_since
                    normalizer = None
                    if ranks.active:  # the update's target tokens in all processes, per process
                        update_tokens = task.update_tokens(update)
                        if update_tokens is None:  # known only once the batches are built: ask the others
                            (update_tokens,) = ranks.sum([sum(b.num_tgt_tokens for b in group)], device)
                        normalizer = update_tokens / ranks.world
                    step += 1
                    lr = inverse_sqrt_lr(step, tc.lr, tc.warmup_steps, tc.min_lr)
                    failure = ""
                    try:
                        loss, skipped = training_update(
                            step_model, optimizer, scaler, group, tc, lr, device, dtype, normalizer, task.loss, frozen_now()
                        )
                    except torch.OutOfMemoryError:
                        failure = "out of memory"
                    except Exception as e:  # torch.compile fails at the first call, if at all
                        if step_model is eager_model:
                            raise
                        failure = f"{type(e).__name__}: {first_line(e)}"
                    # Retries run outside the except blocks: there, the failed attempt's tensors are freed.
                    if failure == "out of memory":
                        loss, skipped = retry_out_of_memory(group, lr)
                    elif failure:
                        log(f"warning: torch.compile failed ({failure}); training continues without it")
                        step_model = eager_model
                        optimizer.zero_grad(set_to_none=True)
                        loss, skipped = training_update(
                            step_model, optimizer, scaler, group, tc, lr, device, dtype, normalizer, task.loss, frozen_now()
                        )
                    interval_loss += loss
                    skipped_run = (skipped_run + 1) * skipped  # updates skipped in a row, on the device
                    longest_skipped_run = torch.maximum(longest_skipped_run, skipped_run)
                    interval_skipped += skipped
                    interval_tokens += sum(b.num_tgt_tokens for b in group)
                    interval_src_tokens += sum(b.num_src_tokens for b in group)
                    group_in_epoch += 1
                    bar.update(1)

                    if step % tc.log_every == 0:
                        seconds = max(time.time() - interval_start, 1e-9)
                        loss_sum, tgt_tokens, src_tokens, skipped_count = ranks.sum(
                            [float(interval_loss), interval_tokens, interval_src_tokens, int(interval_skipped)], device
                        )
                        skipped_count //= ranks.world  # every process skips the same updates
                        record = {
                            "type": "train", "step": step, "epoch": epoch + group_in_epoch / len(groups),
                            "loss": round(loss_sum / max(tgt_tokens, 1), 4), "lr": lr,
                            "tgt_tokens_per_s": round(tgt_tokens / seconds),
                            "tokens_per_s": round((tgt_tokens + src_tokens) / seconds),
                            "batch_wait_fraction": round(interval_wait / seconds, 4),
                        }
                        skipped_count = int(skipped_count)
                        if skipped_count:
                            record["skipped_updates"] = skipped_count
                            cause = "fp16 gradient overflow (loss scale lowered) or non-finite loss" if scaler else "non-finite loss or gradient"
                            log(f"warning: {skipped_count} update(s) up to step {step} skipped: {cause}")
                            interval_skipped.zero_()
                        write_log(record)
                        postfix = {"loss": f"{record['loss']:.3f}", "lr": f"{lr:.2e}", "tok/s": record[task.throughput]}
                        if tc.max_minutes and not tc.max_steps:
                            left = tc.max_minutes - (elapsed_before + time.time() - started) / 60
                            postfix["left"] = f"{max(left, 0):.1f}min"
                        bar.set_postfix(postfix)
                        interval_loss.zero_()
                        interval_tokens, interval_src_tokens, interval_start = 0, 0, time.time()
                        interval_wait = 0.0

                    # Reading the count waits for the GPU: there, only at log steps.
                    if tc.max_skipped_updates and (device.type != "cuda" or step % tc.log_every == 0):
                        if int(longest_skipped_run) >= tc.max_skipped_updates:
                            stop_reason = TOO_MANY_SKIPPED
                            log(
                                f"error: {int(longest_skipped_run)} updates in a row were skipped (non-finite loss or "
                                f"gradient, or out of memory); stopping at step {step} with the weights of the last "
                                "good update. A lower train.lr, more train.warmup_steps or a smaller "
                                "train.batch_tokens may help."
                            )
                            break
                    if step % tc.valid_every == 0:
                        validated_at = step
                        stop_reason = run_validation()
                    # Signals and the clock differ between processes: with several, they decide
                    # together at log steps, so that all stop at the same update.
                    if not stop_reason and (not ranks.active or step % tc.log_every == 0):
                        out_of_time = tc.max_minutes and elapsed_before + time.time() - started >= tc.max_minutes * 60
                        signalled = ranks.agree(int(bool(stop_signal.received)), device)
                        if signalled:
                            name = stop_signal.received or "SIGTERM"
                            stop_reason = f"signal ({name})"
                            save("last")
                            log(f"stopped by {name} at step {step}; continue with --resume")
                            validated_at = step  # saved; no final validation on the way out
                        elif ranks.agree(int(bool(out_of_time)), device):
                            stop_reason = "max_minutes"
                    if not stop_reason and tc.max_steps and step >= tc.max_steps:
                        stop_reason = "max_steps"
                    if stop_reason:
                        break
            if group_in_epoch >= len(groups):
                epoch, group_in_epoch = epoch + 1, 0
        if validated_at != step:
            run_validation()
    finally:
        stop_signal.restore()
        bar.close()
        if train_log:
            train_log.close()
    return TrainResult(
        save_dir=save_dir,
        steps=step,
        epochs=round(epoch + group_in_epoch / max(len(groups), 1), 2),
        best_score=best_score,
        best_step=best_step,
        metric_name=task.metric_name,
        last_valid=last_valid,
        seconds=round(elapsed_before + time.time() - started, 1),
        stop_reason=stop_reason,
        main_process=ranks.is_main,
    )
