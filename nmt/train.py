"""`nmt train`: token-bucketed batches, AdamW with inverse-square-root warmup, label smoothing,
mixed precision, periodic validation (loss and BLEU), best/last checkpoints and exact resume."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nmt.checkpoint import (
    has_checkpoint,
    init_save_dir,
    load_training_state,
    read_config,
    read_vocab_info,
    recover_checkpoints,
    save_checkpoint,
)
from nmt.config import Config, DecodeConfig, TrainConfig
from nmt.data import Batch, ParallelSplit, make_batch, read_lines, read_manifest, token_batches
from nmt.devices import autocast, resolve_device, resolve_precision
from nmt.errors import CheckpointError, ConfigError
from nmt.evaluate import corpus_bleu
from nmt.models import build_model
from nmt.tokenizer import PAD, Tokenizer
from nmt.translate import translate_ids


TOO_MANY_SKIPPED = "skipped updates"


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
    best_bleu: float
    best_step: int
    last_valid: dict
    seconds: float
    stop_reason: str


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


def make_optimizer(model: torch.nn.Module, tc: TrainConfig, device: torch.device, fused: bool | None = None):
    """AdamW; the fused CUDA kernel on GPUs (one launch for all parameters)."""
    return torch.optim.AdamW(
        model.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay,
        fused=(device.type == "cuda") if fused is None else fused,
    )


def split_batch(batch: Batch) -> list[Batch]:
    """The batch as two halves by sentences (one sentence stays one batch)."""
    half = batch.src.shape[0] // 2
    if half == 0:
        return [batch]
    parts = []
    for rows in (slice(0, half), slice(half, None)):
        src, tgt_in, tgt_out = batch.src[rows], batch.tgt_in[rows], batch.tgt_out[rows]
        parts.append(Batch(
            src, tgt_in, tgt_out, num_tgt_tokens=int((tgt_out != PAD).sum()),
            num_src_tokens=int((src != PAD).sum()), indices=batch.indices[rows],
        ))
    return parts


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model's forward compiled by torch.compile, for the varying batch shapes of training."""
    return torch.compile(model, dynamic=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def training_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    group: list[Batch],
    tc: TrainConfig,
    lr: float,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer update from the gradients of `group`'s batches added up (accumulation).

    An update whose loss or gradient norm is not finite is skipped. Returns the summed
    label-smoothed loss (0 when skipped) and whether it was skipped, as tensors left on the
    device: reading them would wait for the GPU, so the caller decides when.
    """
    group_tokens = sum(b.num_tgt_tokens for b in group)
    total = torch.zeros((), device=device)
    for batch in group:
        with autocast(device, dtype):
            logits = model(batch.src, batch.tgt_in)  # (B, T, V)
        loss = token_loss(logits, batch.tgt_out, tc.label_smoothing)
        total += loss.detach()
        scaled = loss / group_tokens  # the update follows the mean loss per target token
        (scaler.scale(scaled) if scaler else scaled).backward()
    for param_group in optimizer.param_groups:
        param_group["lr"] = lr
    if scaler:
        scaler.unscale_(optimizer)
    # The norm is needed even without clipping, to see non-finite gradients.
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_norm if tc.clip_norm > 0 else float("inf"))
    if scaler:  # fp16: overflowing gradients are routine; the scaler skips those updates itself
        skipped = ~torch.isfinite(total)
        scaler.step(optimizer)
        scaler.update()
    else:
        skipped = ~(torch.isfinite(total) & torch.isfinite(norm))
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            # Fused AdamW takes the decision as a tensor and skips on the device: no host sync.
            optimizer.found_inf = skipped.float()
            optimizer.step()
            del optimizer.found_inf
        elif not bool(skipped):
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return torch.where(skipped, torch.zeros_like(total), total), skipped


@torch.no_grad()
def validate(
    model,
    split: ParallelSplit,
    references: list[str],
    tokenizer: Tokenizer,
    config: Config,
    device: torch.device,
    dtype: torch.dtype,
) -> dict:
    """Dev loss (teacher forced, no smoothing) and BLEU of the decoded dev sources."""
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
        "bleu": round(corpus_bleu(texts, references[:count]), 2),
        "sentences": count,
    }


def _check_resumable(save_dir: Path, config: Config, manifest: dict) -> None:
    saved = read_config(save_dir)
    if saved.model != config.model:
        for field in dataclasses.fields(saved.model):
            old, new = getattr(saved.model, field.name), getattr(config.model, field.name)
            if old != new:
                raise ConfigError(
                    f"model.{field.name} is {new!r} but the checkpoint in {save_dir} was built with {old!r}"
                )
    _check_vocab(save_dir, manifest, config.data_dir)


def _check_vocab(save_dir: Path, manifest: dict, data_dir: str) -> None:
    saved = read_vocab_info(save_dir)["vocab"]
    if (saved["src_sha256"], saved["tgt_sha256"]) != (manifest["vocab"]["src_sha256"], manifest["vocab"]["tgt_sha256"]):
        raise CheckpointError(
            f"the checkpoint in {save_dir} was trained with a different vocabulary than data dir {data_dir}"
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
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    manifest = read_manifest(data_dir)
    tc = config.train
    device = resolve_device(tc.device)
    dtype = resolve_precision(tc.precision, device)
    if tc.threads:
        torch.set_num_threads(tc.threads)

    recover_checkpoints(save_dir)
    if has_checkpoint(save_dir):
        if resume:
            _check_resumable(save_dir, config, manifest)
        elif overwrite:
            for name in ("best", "last", "train_log.jsonl"):
                path = save_dir / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        else:
            raise CheckpointError(
                f"{save_dir} already holds a model; pass --resume to continue it or --overwrite to start again"
            )
    elif resume:
        raise CheckpointError(f"nothing to resume: {save_dir} holds no checkpoint")

    tokenizer = Tokenizer(data_dir / manifest["vocab"]["src_model"], data_dir / manifest["vocab"]["tgt_model"])
    train_split = ParallelSplit.load(data_dir, "train")
    valid_split = ParallelSplit.load(data_dir, "valid")
    references = list(read_lines(data_dir / "valid.tgt.txt"))

    torch.manual_seed(tc.seed)
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size).to(device)
    optimizer = make_optimizer(model, tc, device)
    # Updates run through `step_model`; checkpoints save `model`, whose parameter names are plain.
    step_model = compile_model(model) if tc.compile else model
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    step, epoch, group_in_epoch = 0, 0, 0
    best_bleu, best_step, bad_validations, elapsed_before, valid_seconds = -1.0, 0, 0, 0.0, 0.0
    last_valid: dict = {}
    if resume:
        info, rng = load_training_state(save_dir, model, optimizer)
        step, epoch, group_in_epoch = info["step"], info["epoch"], info["group_in_epoch"]
        best_bleu, best_step = info["best_bleu"], info["best_step"]
        bad_validations, elapsed_before = info["bad_validations"], info["seconds"]
        valid_seconds = info.get("valid_seconds", 0.0)
        last_valid = info.get("last_valid", {})
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        log(f"resuming {save_dir} at step {step} (epoch {epoch + 1})")
    else:
        save_dir.mkdir(parents=True, exist_ok=True)
        init_save_dir(save_dir, config, data_dir, manifest)

    params = sum(p.numel() for p in model.parameters())
    log(
        f"model: {config.model.arch}, {params / 1e6:.1f}M parameters; device {device}, "
        f"{str(dtype).replace('torch.', '')}; {len(train_split)} training pairs"
    )
    log_file = open(save_dir / "train_log.jsonl", "a", encoding="utf-8")

    def write_log(record: dict) -> None:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    def save(name: str) -> None:
        rng = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        info = {
            "step": step, "epoch": epoch, "group_in_epoch": group_in_epoch, "best_bleu": best_bleu,
            "best_step": best_step, "bad_validations": bad_validations,
            "seconds": round(elapsed_before + time.time() - started, 1), "valid_seconds": round(valid_seconds, 1),
            "last_valid": last_valid,
        }
        if name == "last":
            save_checkpoint(save_dir, name, model, info, optimizer, rng)
        else:
            save_checkpoint(save_dir, name, model, info)

    def run_validation() -> str:
        """Validate and save checkpoints; returns why training should stop, or ""."""
        nonlocal best_bleu, best_step, bad_validations, last_valid, valid_seconds
        valid_started = time.time()
        last_valid = {"step": step, **validate(model, valid_split, references, tokenizer, config, device, dtype)}
        valid_seconds += time.time() - valid_started
        seconds = elapsed_before + time.time() - started
        improved = last_valid["bleu"] > best_bleu
        if improved:
            best_bleu, best_step, bad_validations = last_valid["bleu"], step, 0
            save("best")
        else:
            bad_validations += 1
        save("last")
        # train_seconds leaves out validation: the time to reach a dev BLEU, as benchmarks count it
        write_log({
            "type": "valid", **last_valid, "seconds": round(seconds, 1),
            "train_seconds": round(seconds - valid_seconds, 1),
        })
        log(
            f"step {step}: dev loss {last_valid['loss']:.3f}, ppl {last_valid['ppl']:.2f}, "
            f"BLEU {last_valid['bleu']:.2f}" + (" (best)" if improved else f" (best {best_bleu:.2f} at {best_step})")
        )
        if tc.target_bleu and last_valid["bleu"] >= tc.target_bleu:
            return "target_bleu"
        return "patience" if tc.patience and bad_validations >= tc.patience else ""

    def retry_out_of_memory(group: list[Batch], lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """After running out of memory on `group`: the same update from half-size batches, or
        none if that fails too (counted as a skipped update)."""
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        halves = [half for batch in group for half in split_batch(batch)]
        try:
            loss, skipped = training_update(step_model, optimizer, scaler, halves, tc, lr, device, dtype)
            log(f"warning: out of memory at step {step}; the update was made from half-size batches")
            return loss, skipped
        except torch.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            sizes = "+".join(str(b.src.shape[0]) for b in group)
            log(f"warning: out of memory at step {step} even with half-size batches; skipped {sizes} sentences")
            return torch.zeros((), device=device), torch.ones((), dtype=torch.bool, device=device)

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
            batches = token_batches(
                train_split.src.lengths, train_split.tgt.lengths, tc.batch_tokens, seed=tc.seed * 100_003 + epoch
            )
            groups = [batches[i : i + tc.accum_steps] for i in range(0, len(batches), tc.accum_steps)]
            if not tc.max_steps and tc.max_epochs and bar.total is None:
                bar.total = tc.max_epochs * len(groups)  # for the ETA; batch counts vary a little
            while group_in_epoch < len(groups):
                group = [make_batch(train_split, indices, pin).to(device) for indices in groups[group_in_epoch]]
                step += 1
                lr = inverse_sqrt_lr(step, tc.lr, tc.warmup_steps, tc.min_lr)
                try:
                    loss, skipped = training_update(step_model, optimizer, scaler, group, tc, lr, device, dtype)
                except torch.OutOfMemoryError:
                    loss, skipped = retry_out_of_memory(group, lr)
                except Exception as e:  # torch.compile fails at the first call, if at all
                    if step_model is model:
                        raise
                    log(f"warning: torch.compile failed ({_first_line(e)}); training continues without it")
                    step_model = model
                    optimizer.zero_grad(set_to_none=True)
                    loss, skipped = training_update(model, optimizer, scaler, group, tc, lr, device, dtype)
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
                    record = {
                        "type": "train", "step": step, "epoch": epoch + group_in_epoch / len(groups),
                        "loss": round(float(interval_loss) / max(interval_tokens, 1), 4), "lr": lr,
                        "tgt_tokens_per_s": round(interval_tokens / seconds),
                        "tokens_per_s": round((interval_tokens + interval_src_tokens) / seconds),
                    }
                    skipped_count = int(interval_skipped)
                    if skipped_count:
                        record["skipped_updates"] = skipped_count
                        log(f"warning: {skipped_count} update(s) up to step {step} skipped: non-finite loss or gradient")
                        interval_skipped.zero_()
                    write_log(record)
                    postfix = {"loss": f"{record['loss']:.3f}", "lr": f"{lr:.2e}", "tok/s": record["tgt_tokens_per_s"]}
                    if tc.max_minutes and not tc.max_steps:
                        left = tc.max_minutes - (elapsed_before + time.time() - started) / 60
                        postfix["left"] = f"{max(left, 0):.1f}min"
                    bar.set_postfix(postfix)
                    interval_loss.zero_()
                    interval_tokens, interval_src_tokens, interval_start = 0, 0, time.time()

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
                if not stop_reason and stop_signal.received:
                    stop_reason = f"signal ({stop_signal.received})"
                    save("last")
                    log(f"stopped by {stop_signal.received} at step {step}; continue with --resume")
                    validated_at = step  # saved; no final validation on the way out
                if not stop_reason and tc.max_steps and step >= tc.max_steps:
                    stop_reason = "max_steps"
                if not stop_reason and tc.max_minutes and elapsed_before + time.time() - started >= tc.max_minutes * 60:
                    stop_reason = "max_minutes"
                if stop_reason:
                    break
            if group_in_epoch >= len(groups):
                epoch, group_in_epoch = epoch + 1, 0
        if validated_at != step:
            run_validation()
    finally:
        stop_signal.restore()
        bar.close()
        log_file.close()
    return TrainResult(
        save_dir=save_dir,
        steps=step,
        epochs=round(epoch + group_in_epoch / max(len(groups), 1), 2),
        best_bleu=best_bleu,
        best_step=best_step,
        last_valid=last_valid,
        seconds=round(elapsed_before + time.time() - started, 1),
        stop_reason=stop_reason,
    )
