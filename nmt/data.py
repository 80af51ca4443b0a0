"""Parallel text: reading (files, TSV, Hugging Face `datasets`), cleaning, binarized storage and
token-bucketed batches."""

from __future__ import annotations

import gzip
import hashlib
import json
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nmt.errors import DataError, first_line
from nmt.shards import TokenArray
from nmt.tokenizer import BOS, EOS, PAD

# ---------------------------------------------------------------------------------------------
# Reading


def open_binary(path: Path):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def decode_lines(binary_lines: Iterable[bytes], name: str, replace_invalid: bool = False) -> Iterator[str]:
    """Decode UTF-8 lines, naming the file and line of invalid bytes, and strip the line ending.

    Only `\\n` ends a line: a stray `\\r` or Unicode line separator inside a sentence must not
    split it, or the two sides of a corpus drift apart.
    """
    errors = "replace" if replace_invalid else "strict"
    lineno = 0
    try:
        for lineno, raw in enumerate(binary_lines, 1):
            try:
                line = raw.decode("utf-8", errors=errors)
            except UnicodeDecodeError as e:
                raise DataError(f"{name}:{lineno}: invalid UTF-8 (byte {e.start}: {e.reason})") from None
            if line.endswith("\n"):
                line = line[:-1]
            if line.endswith("\r"):
                line = line[:-1]
            yield line
    except (OSError, EOFError) as e:  # e.g. a truncated .gz file
        raise DataError(f"{name}: cannot read after line {lineno} ({e})") from None


def read_lines(path: Path, replace_invalid: bool = False) -> Iterator[str]:
    """Yield the lines of a UTF-8 text file (plain or .gz) without their line ending."""
    with open_binary(path) as f:
        yield from decode_lines(f, str(path), replace_invalid)


def read_parallel_files(src_path: Path, tgt_path: Path) -> Iterator[tuple[str, str]]:
    """Yield aligned (source, target) lines; a different number of lines is an error."""
    src_lines, tgt_lines = read_lines(src_path), read_lines(tgt_path)
    count = 0
    for src in src_lines:
        tgt = next(tgt_lines, None)
        if tgt is None:
            rest = sum(1 for _ in src_lines)
            raise DataError(
                f"line counts differ: {src_path} has {count + 1 + rest} lines, {tgt_path} has {count}"
            )
        count += 1
        yield src, tgt
    rest = sum(1 for _ in tgt_lines)
    if rest:
        raise DataError(f"line counts differ: {src_path} has {count} lines, {tgt_path} has {count + rest}")


def read_tsv(path: Path, src_column: int, tgt_column: int) -> Iterator[tuple[str, str]]:
    """Yield (source, target) from a tab-separated file; every row must have the same fields."""
    expected = None
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if expected is None:
            expected = len(fields)
            if expected <= max(src_column, tgt_column):
                raise DataError(
                    f"{path}:{lineno}: {expected} tab-separated fields, but column "
                    f"{max(src_column, tgt_column) + 1} was asked for"
                )
        elif len(fields) != expected:
            raise DataError(f"{path}:{lineno}: {len(fields)} tab-separated fields, expected {expected}")
        yield fields[src_column], fields[tgt_column]


def find_side_file(prefix: str | Path, lang: str) -> Path:
    """`data/train` + `de` -> `data/train.de` or `data/train.de.gz`, whichever exists."""
    for candidate in (Path(f"{prefix}.{lang}"), Path(f"{prefix}.{lang}.gz")):
        if candidate.is_file():
            return candidate
    raise DataError(f"file not found: {prefix}.{lang} (or {prefix}.{lang}.gz)")


HF_SPLIT_NAMES = {
    "train": ("train",),
    "valid": ("validation", "valid", "dev", "val"),
    "test": ("test",),
}


def load_hf_corpus(
    name: str, config: str | None, src_lang: str, tgt_lang: str, revision: str | None = None,
    data_dir: str | None = None,
) -> dict[str, list[tuple[str, str]]]:
    """Load a parallel corpus with Hugging Face `datasets`: a Hub id or a local folder/file.

    Returns the pairs of each split found (train, valid, test). Handles the three usual column
    layouts: a `translation` dict, flat language columns, or `sourceString`/`targetString`.
    """
    import datasets  # slow to import; only prepare needs it

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    kwargs = {k: v for k, v in (("revision", revision), ("data_dir", data_dir)) if v}
    try:
        try:
            loaded = datasets.load_dataset(name, config, **kwargs)
        except RuntimeError as e:
            if "scripts are no longer supported" not in str(e) or revision:
                raise
            # Script-based Hub repos: their automatic parquet export holds the same data.
            loaded = datasets.load_dataset(
                name, revision="refs/convert/parquet", data_dir=config or None
            )
    except FileNotFoundError as e:
        raise DataError(f"dataset {name!r} not found ({first_line(e)})") from None
    except (ValueError, ConnectionError, OSError, RuntimeError) as e:
        raise DataError(f"cannot load dataset {name!r}: {first_line(e)}") from None
    splits: dict[str, list[tuple[str, str]]] = {}
    for split, names in HF_SPLIT_NAMES.items():
        found = next((n for n in names if n in loaded), None)
        if found is not None:
            splits[split] = list(_hf_pairs(loaded[found], src_lang, tgt_lang, f"{name}:{found}"))
    if "train" not in splits:
        raise DataError(f"dataset {name!r} has no train split (splits: {', '.join(loaded)})")
    return splits


def _hf_pairs(table, src_lang: str, tgt_lang: str, where: str) -> Iterator[tuple[str, str]]:
    columns = table.column_names
    if "translation" in columns:
        for row in table["translation"]:
            if src_lang not in row or tgt_lang not in row:
                raise DataError(f"{where}: translation has no {src_lang!r}/{tgt_lang!r} (has {list(row)})")
            yield row[src_lang] or "", row[tgt_lang] or ""
    elif src_lang in columns and tgt_lang in columns:
        for src, tgt in zip(table[src_lang], table[tgt_lang]):
            yield src or "", tgt or ""
    else:
        raise DataError(
            f"{where}: no 'translation' column and no {src_lang!r}/{tgt_lang!r} columns "
            f"(columns: {', '.join(columns)})"
        )


# ---------------------------------------------------------------------------------------------
# Cleaning


@dataclass
class CleanConfig:
    normalization: str = "NFC"  # Unicode normal form, or "none"
    max_words: int = 250  # pairs with a longer side (in whitespace-separated words) are dropped
    max_ratio: float = 3.0  # pairs whose longer side has more than this × the words of the other
    dedup: bool = True


@dataclass
class CleanStats:
    pairs_read: int = 0
    normalized: int = 0  # pairs changed by Unicode normalization
    whitespace_fixed: int = 0  # pairs changed by stripping/collapsing whitespace
    empty: int = 0
    too_long: int = 0
    ratio: int = 0
    duplicates: int = 0
    kept: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def normalize_text(text: str, form: str) -> str:
    if form.lower() == "none":
        return text
    return unicodedata.normalize(form.upper(), text)


def clean_whitespace(text: str) -> str:
    # str.split() also splits on control separators such as \r, \t, \x1c-\x1f and U+2028.
    return " ".join(text.split())


class PairCleaner:
    """Normalizes and filters pairs one at a time, counting what each step changed or dropped.

    Duplicates are not its business: prepare finds them from `pair_hash` once all pairs are read.
    """

    def __init__(self, config: CleanConfig):
        self.config = config
        self.stats = CleanStats()

    def __call__(self, src: str, tgt: str) -> tuple[str, str] | None:
        stats, config = self.stats, self.config
        stats.pairs_read += 1
        norm_src, norm_tgt = normalize_text(src, config.normalization), normalize_text(tgt, config.normalization)
        stats.normalized += (norm_src, norm_tgt) != (src, tgt)
        src, tgt = clean_whitespace(norm_src), clean_whitespace(norm_tgt)
        stats.whitespace_fixed += (src, tgt) != (norm_src, norm_tgt)
        if not src or not tgt:
            stats.empty += 1
            return None
        src_words, tgt_words = src.count(" ") + 1, tgt.count(" ") + 1
        if max(src_words, tgt_words) > config.max_words:
            stats.too_long += 1
            return None
        if max(src_words, tgt_words) > config.max_ratio * min(src_words, tgt_words):
            stats.ratio += 1
            return None
        return src, tgt


def pair_hash(src: str, tgt: str) -> int:
    """A 64-bit hash of a cleaned pair, the same in every process and run: duplicates share it."""
    digest = hashlib.blake2b(src.encode("utf-8") + b"\t" + tgt.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


# ---------------------------------------------------------------------------------------------
# Prepared splits


@dataclass
class ParallelSplit:
    src: TokenArray
    tgt: TokenArray

    @classmethod
    def load(cls, data_dir: Path, split: str) -> "ParallelSplit":
        pair = cls(TokenArray(data_dir, f"{split}.src"), TokenArray(data_dir, f"{split}.tgt"))
        if len(pair.src) != len(pair.tgt):
            raise DataError(f"{data_dir}: {split} source and target counts differ; run nmt prepare again")
        return pair

    def __len__(self) -> int:
        return len(self.src)


def read_manifest(data_dir: Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{data_dir} is not a prepared data dir (no manifest.json); run nmt prepare")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise DataError(f"{path} is damaged; run nmt prepare again") from None


# ---------------------------------------------------------------------------------------------
# Batches


def token_batches(
    src_lengths: np.ndarray,
    tgt_lengths: np.ndarray,
    batch_tokens: int,
    seed: int | None = None,
    max_sentences: int = 0,
) -> list[np.ndarray]:
    """Group sentence indices into batches of similar length.

    A batch holds as many sentences as fit `batch_tokens` padded tokens, counting the longer
    side plus its BOS/EOS. With a seed, ties in length are broken at random and the batch order
    is shuffled, so each epoch sees different batches; without one, the order is by length.
    """
    sizes = np.maximum(src_lengths, tgt_lengths) + 1
    rng = np.random.default_rng(seed) if seed is not None else None
    order = rng.permutation(len(sizes)) if rng is not None else np.arange(len(sizes))
    order = order[np.argsort(sizes[order], kind="stable")]
    # Sorted by size, a batch is a run of sentences; fill runs greedily, one size at a time
    # (a few hundred sizes, not millions of sentences): a batch holds `capacity` sentences of
    # its longest size, and one that is not full takes sentences of the next size.
    values, counts = np.unique(sizes[order], return_counts=True)
    starts: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
    position, in_batch = 0, 0  # sentences placed so far; of them, in the open batch
    for size, count in zip(values.tolist(), counts.tolist()):
        capacity = max(1, batch_tokens // size)
        if max_sentences:
            capacity = min(capacity, max_sentences)
        taken = 0
        if in_batch:
            taken = min(count, max(0, capacity - in_batch))
            in_batch += taken
            if taken < count:  # the open batch is full: the rest starts new ones
                starts.append(np.array([position + taken]))
                in_batch = 0
        rest = count - taken
        full, partial = divmod(rest, capacity)
        first = position + taken
        starts.append(first + capacity * np.arange(1, full + (partial > 0)))  # batches after the first of the rest
        if rest:
            in_batch = partial or capacity
        position += count
    bounds = np.concatenate(starts + [np.array([len(order)])])
    bounds = bounds[bounds <= len(order)]
    batches = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    if rng is not None:
        rng.shuffle(batches)
    return batches


@dataclass
class Batch:
    src: torch.Tensor  # (B, S) source ids + EOS, padded with PAD
    tgt_in: torch.Tensor  # (B, T) BOS + target ids
    tgt_out: torch.Tensor  # (B, T) target ids + EOS
    num_tgt_tokens: int  # real (non-pad) tokens in tgt_out
    num_src_tokens: int = 0
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def to(self, device: torch.device) -> "Batch":
        non_blocking = device.type == "cuda"
        return Batch(
            self.src.to(device, non_blocking=non_blocking),
            self.tgt_in.to(device, non_blocking=non_blocking),
            self.tgt_out.to(device, non_blocking=non_blocking),
            self.num_tgt_tokens,
            self.num_src_tokens,
            self.indices,
        )


def pad_source(sequences: list[np.ndarray] | list[list[int]]) -> torch.Tensor:
    """Source ids + EOS, right-padded: (B, S)."""
    width = max(len(s) for s in sequences) + 1
    out = np.full((len(sequences), width), PAD, dtype=np.int64)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = seq
        out[row, len(seq)] = EOS
    return torch.from_numpy(out)


def make_batch(split: ParallelSplit, indices: np.ndarray, pin_memory: bool = False) -> Batch:
    src = pad_source([split.src[i] for i in indices])
    tgt_seqs = [split.tgt[i] for i in indices]
    width = max(len(s) for s in tgt_seqs) + 1
    tgt_in = np.full((len(indices), width), PAD, dtype=np.int64)
    tgt_out = np.full((len(indices), width), PAD, dtype=np.int64)
    for row, seq in enumerate(tgt_seqs):
        tgt_in[row, 0] = BOS
        tgt_in[row, 1 : len(seq) + 1] = seq
        tgt_out[row, : len(seq)] = seq
        tgt_out[row, len(seq)] = EOS
    batch = Batch(
        src,
        torch.from_numpy(tgt_in),
        torch.from_numpy(tgt_out),
        num_tgt_tokens=int(sum(len(s) for s in tgt_seqs) + len(tgt_seqs)),
        num_src_tokens=int((src != PAD).sum()),
        indices=indices,
    )
    if pin_memory:
        batch.src, batch.tgt_in, batch.tgt_out = (t.pin_memory() for t in (batch.src, batch.tgt_in, batch.tgt_out))
    return batch


class BatchPrefetcher:
    """Builds the batches of the next updates in a background thread, `ahead` updates ahead of
    the one training, so that the device does not wait for data.

    `build(index)` makes the batches of update `index`; `next()` returns them for `first`,
    `first + 1`, ... up to `end`, in order. A failure in `build` is raised by `next()`.
    """

    def __init__(self, build: Callable[[int], list[Batch]], first: int, end: int, ahead: int = 2):
        self.build, self.next_index, self.end = build, first, end
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="batches")
        self.pending: deque[Future] = deque()
        for _ in range(ahead):
            self._submit()

    def _submit(self) -> None:
        if self.next_index < self.end:
            self.pending.append(self.pool.submit(self.build, self.next_index))
            self.next_index += 1

    def next(self) -> list[Batch]:
        future = self.pending.popleft()
        self._submit()
        return future.result()

    def __enter__(self) -> "BatchPrefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
