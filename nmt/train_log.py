"""The training log of a checkpoint directory: `train_log.jsonl` (one JSON record per log step
and per validation), mirrored to TensorBoard when the tensorboard package is installed."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from nmt.errors import CheckpointError, DataError

LOG_NAME = "train_log.jsonl"
TENSORBOARD_DIR = "tensorboard"
# The record kinds TensorBoard shows, under which tag prefix: each of their number fields is a scalar.
TENSORBOARD_PREFIXES = {"train": "train", "valid": "dev"}


class TrainLog:
    """Appends records to train_log.jsonl and, optionally, to TensorBoard event files."""

    def __init__(self, save_dir: Path, tensorboard: bool, warn: Callable[[str], None]):
        try:
            cut_unfinished_record(save_dir / LOG_NAME)
            self.file = open(save_dir / LOG_NAME, "a", encoding="utf-8")
        except OSError as e:
            raise CheckpointError(f"cannot write {save_dir / LOG_NAME}: {e.strerror or e}") from None
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warn("note: TensorBoard logs are off: the tensorboard package is not installed")
            else:
                self.writer = SummaryWriter(str(save_dir / TENSORBOARD_DIR))

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            prefix = TENSORBOARD_PREFIXES.get(record.get("type"))
            numbers = {key: value for key, value in record.items() if is_number(value) and key != "step"} if prefix else {}
            for key, value in numbers.items():
                self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def cut_unfinished_record(path: Path) -> None:
    """Cut a last record without its newline (a run killed while writing it), so that the
    records appended after it start a line of their own."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        start = max(0, size - (1 << 20))  # records are short: the last newline is in the last MiB
        f.seek(start)
        tail = f.read()
        if tail and not tail.endswith(b"\n"):
            f.truncate(start + tail.rfind(b"\n") + 1)


# The fields of each record kind that readers of the log (`nmt plot`, `nmt average`) rely on;
# a train record's loss is null when every update of its interval was skipped.
REQUIRED_NUMBERS = {"train": ("loss", "lr"), "valid": ("loss",)}


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def score_key(record: dict) -> str:
    """The key of a validation record's dev score: the one it names (`metric`), or in a log
    written before records named it, BLEU's, or for `nmt pretrain`, masked accuracy's."""
    metric = record.get("metric")
    if isinstance(metric, str) and metric:
        return metric
    return "bleu" if "bleu" in record else "accuracy"


def direction_keys(record: dict) -> dict[str, str]:
    """A multilingual run's validation record: direction -> the key of its dev score
    (`bleu_de-en`)."""
    prefix = score_key(record) + "_"
    return {key[len(prefix):]: key for key in record if key.startswith(prefix)}


def _not_a_number(record: dict, required: tuple[str, ...]) -> str | None:
    """The first field of `record` that should hold a number and does not: one of `required`,
    or a validation record's scores (overall and per direction)."""
    scores = []
    if record["type"] == "valid":  # the score it names, or in a log from before records named it, those it holds
        key = score_key(record)
        scores = [*([key] if "metric" in record or key in record else []), *direction_keys(record).values()]
    for key in (*required, *scores):
        value = record.get(key)
        if value is None and key == "loss" and record["type"] == "train" and key in record:
            continue
        if not is_number(value):
            return key
    return None


def read_train_log(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """The training and the validation records of a run, by step.

    A run resumed from its last checkpoint logs again the steps after that checkpoint: the
    later records replace the earlier ones from the same step on.
    """
    path = Path(run_dir) / LOG_NAME
    if not path.is_file():
        raise DataError(f"no {LOG_NAME} in {run_dir}: not a checkpoint directory of nmt train")
    records: dict[str, list[dict]] = {"train": [], "valid": []}
    with open(path, encoding="utf-8", errors="replace") as f:  # a bad byte spoils its record only
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if f.read(1) == "":  # a last line cut short by a crash
                    break
                raise DataError(f"{path}, line {lineno}: not a JSON record") from None
            kind = record.get("type") if isinstance(record, dict) else None
            if kind not in records:
                continue
            if not isinstance(record.get("step"), int) or isinstance(record["step"], bool):
                raise DataError(f"{path}, line {lineno}: a {kind} record without a whole-number step")
            if (field := _not_a_number(record, REQUIRED_NUMBERS[kind])) is not None:
                raise DataError(f"{path}, line {lineno}: a {kind} record whose {field!r} is not a number")
            same_kind = records[kind]
            while same_kind and same_kind[-1]["step"] >= record["step"]:
                same_kind.pop()
            same_kind.append(record)
    return records["train"], records["valid"]
