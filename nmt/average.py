"""`nmt average`: a model directory whose weights are the mean of several checkpoints of one run
(the last N kept by `train.keep_last`, or the N best by dev score, kept by `train.keep_best`).
The mean of checkpoints near the end of training usually translates better than any one of them
(Vaswani et al., 2017, averaged the last 5 or 20)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from nmt.atomic import replace_dir, temporary_beside
from nmt.checkpoint import (
    UpdateCheckpoint,
    copy_model_description,
    load_weights,
    read_config,
    save_checkpoint,
    update_checkpoints,
    verify_files,
)
from nmt.errors import CheckpointError, ConfigError
from nmt.files import TRANSLATION, CheckpointInfo, VocabInfo
from nmt.models import build_model
from nmt.paths import followed_link, nested
from nmt.train_log import LOG_NAME, read_train_log


def average_weights(paths: Sequence[Path]) -> dict[str, torch.Tensor]:
    """The mean of the tensors of these model.safetensors files, summed in float64 and stored
    in each tensor's own dtype. Files with other tensor names or shapes are refused in one line."""
    total: dict[str, torch.Tensor] = {}
    first = None
    for path in paths:
        tensors = _read_tensors(path)
        if first is None:
            first, total = (path, tensors), {name: t.to(torch.float64) for name, t in tensors.items()}
            dtypes = {name: t.dtype for name, t in tensors.items()}
            continue
        _check_same_tensors(first, (path, tensors))
        for name, tensor in tensors.items():
            total[name] += tensor.to(torch.float64)
    return {name: (t / len(paths)).to(dtypes[name]) for name, t in total.items()}


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is missing or damaged ({e})") from None


def _check_same_tensors(first: tuple[Path, dict], other: tuple[Path, dict]) -> None:
    (first_path, a), (other_path, b) = first, other
    for name in sorted(a.keys() | b.keys()):
        if name not in a or name not in b:
            holder = first_path if name in a else other_path
            raise CheckpointError(f"cannot average {first_path} and {other_path}: only {holder} has the tensor {name}")
        if a[name].shape != b[name].shape:
            raise CheckpointError(
                f"cannot average {first_path} and {other_path}: {name} has shape {tuple(a[name].shape)} in one "
                f"and {tuple(b[name].shape)} in the other"
            )


def choose_checkpoints(model_dir: Path, last: int = 0, best: int = 0) -> list[UpdateCheckpoint]:
    """The `last` latest or the `best` best kept update checkpoints of `model_dir`, oldest first.

    Training keeps the union of its last keep_last and best keep_best: the N latest of them are
    the last N validations only when keep_last >= N (and likewise for the best)."""
    if (last > 0) == (best > 0) or min(last, best) < 0:
        raise ConfigError("give either --last N or --best N (N at least 1)")
    rule, wanted = ("last", last) if last else ("best", best)
    kept = read_config(model_dir).train
    kept_by_rule = kept.keep_last if last else kept.keep_best
    found = update_checkpoints(model_dir)
    if kept_by_rule < wanted:
        raise CheckpointError(
            f"{model_dir} keeps {kept_by_rule} checkpoint(s) by train.keep_{rule}, fewer than {wanted}; "
            f"train with --set train.keep_{rule}={wanted}"
        )
    if len(found) < wanted:  # the run validated fewer times than it could keep
        raise CheckpointError(f"{model_dir} holds {len(found)} kept checkpoint(s) (one per validation so far), "
                              f"fewer than {wanted}; ask for fewer, or train longer")
    chosen = found[-last:] if last else sorted(found, key=lambda c: c.score, reverse=True)[:best]
    if last:
        _check_last_validations(model_dir, chosen, last)
    return sorted(chosen, key=lambda c: c.step)


def _check_last_validations(model_dir: Path, chosen: list[UpdateCheckpoint], last: int) -> None:
    """The latest kept checkpoints are the last validations only if none between was pruned
    (a run resumed with a larger keep_last keeps, besides, a best one from before): the log says."""
    if not (Path(model_dir) / LOG_NAME).is_file():
        return
    _, valid = read_train_log(model_dir)
    # A validation at a stop between two is not kept (its record says so).
    steps = sorted({record["step"] for record in valid if record.get("scheduled", True)})[-last:]
    if len(steps) == last and steps != [c.step for c in chosen]:
        missing = sorted(set(steps) - {c.step for c in chosen})
        raise CheckpointError(
            f"{model_dir} no longer keeps the last {last} validations (step {missing[0]} was pruned); "
            f"use fewer, or --best N"
        )


def average_checkpoints(model_dir: Path, out_dir: Path, last: int = 0, best: int = 0) -> list[UpdateCheckpoint]:
    """Write `out_dir`: a model directory like `model_dir` (config, vocabulary, SentencePiece
    models) whose best/ holds the mean of the chosen checkpoints. Returns the checkpoints."""
    model_dir, out_dir = Path(model_dir), followed_link(Path(out_dir))  # a link is written through, as export's
    if not model_dir.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {model_dir}")
    if nested(out_dir, model_dir):  # training would replace it, or it the model
        raise CheckpointError(f"{out_dir} is {model_dir}, inside it or holds it; give a new --out")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CheckpointError(f"{out_dir} already exists and is a file or not empty; give a new --out")
    config, vocab_info = read_config(model_dir), VocabInfo.read(model_dir)
    if vocab_info.task != TRANSLATION:
        raise CheckpointError(f"{model_dir} is a pretrained masked LM; nmt average averages translation models")
    chosen = choose_checkpoints(model_dir, last, best)
    infos = [CheckpointInfo.read(c.path) for c in chosen]
    for checkpoint, info in zip(chosen, infos):
        verify_files(checkpoint.path, info)
    averaged = average_weights([c.path / "model.safetensors" for c in chosen])
    model = build_model(config.model, vocab_info.vocab.src_size, vocab_info.vocab.tgt_size)
    load_weights(model, chosen[0].path / "model.safetensors")  # checks that the weights fit the config
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in averaged:  # a tied tensor is stored once, under one of its names
                tensor.copy_(averaged[name])
    # Written beside `out_dir` and renamed when complete: a failed run leaves no half model dir.
    tmp = temporary_beside(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        copy_model_description(model_dir, tmp)
        latest = infos[-1]
        save_checkpoint(tmp, "best", model, CheckpointInfo(latest.state, latest.metric, averaged=[str(c.path) for c in chosen]))
        if out_dir.exists():
            out_dir.rmdir()  # empty: checked above
        replace_dir(tmp, out_dir)
    except OSError as e:
        raise CheckpointError(f"could not write {out_dir}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return chosen
