"""Binarized token storage: per split and side, one flat token array (uint16 when the vocabulary
fits, else int32) and an offsets index, both `.npy`. The token array is written as a stream (its
length is known only at the end) and read memory-mapped, so neither writing nor reading holds a
corpus in memory; the index costs 8 bytes per sentence.

This module imports no torch: encoding worker processes load it alone.
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from nmt.errors import DataError, first_line
from nmt.tokenizer import encode_text, reserved_ids

NPY_HEADER_BYTES = 128  # room for the header of a 1-D array of any length


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


class TokenFileWriter:
    """Writes `STEM.tokens.npy` and `STEM.offsets.npy` from sequences appended in order."""

    def __init__(self, directory: Path, stem: str, dtype: np.dtype):
        self.tokens_path = Path(directory) / f"{stem}.tokens.npy"
        self.offsets_path = Path(directory) / f"{stem}.offsets.npy"
        self.dtype = np.dtype(dtype)
        self.file = open(self.tokens_path, "wb")
        self.file.write(b"\0" * NPY_HEADER_BYTES)  # the real header once the length is known
        self.count = 0
        self.lengths: list[np.ndarray] = []

    def append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """`tokens`: the sequences laid end to end; `lengths`: the length of each."""
        self.tokens_file_append(tokens)
        self.lengths.append(np.asarray(lengths, dtype=np.int64))

    def tokens_file_append(self, tokens: np.ndarray) -> None:
        tokens.astype(self.dtype, copy=False).tofile(self.file)
        self.count += len(tokens)

    def close(self) -> dict:
        """Finish both files; returns {"sequences": n, "tokens": n}."""
        header = repr({"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.count,)})
        room = NPY_HEADER_BYTES - 10  # magic (6), version (2), header length (2)
        self.file.seek(0)
        self.file.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", room) + (header.ljust(room - 1) + "\n").encode("latin1"))
        self.file.close()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(self.offsets_path, offsets)
        return {"sequences": len(lengths), "tokens": self.count}


def write_token_file(directory: Path, stem: str, sequences: list[list[int]], dtype: np.dtype) -> dict:
    writer = TokenFileWriter(directory, stem, dtype)
    writer.append(*flatten(sequences, dtype))
    return writer.close()


def concatenate_token_files(directory: Path, stems: list[str], out_stem: str, block: int = 1 << 22) -> dict:
    """One token file holding the sequences of `stems`' files in order (read in blocks of
    `block` tokens); the inputs are removed."""
    writer = TokenFileWriter(directory, out_stem, np.load(Path(directory) / f"{stems[0]}.tokens.npy", mmap_mode="r").dtype)
    for stem in stems:
        part = TokenArray(directory, stem)
        for start in range(0, len(part.tokens), block):
            writer.tokens_file_append(np.asarray(part.tokens[start : start + block]))
        writer.lengths.append(part.lengths)
        del part
        for suffix in (".tokens.npy", ".offsets.npy"):
            (Path(directory) / f"{stem}{suffix}").unlink()
    return writer.close()


def flatten(sequences: list[list[int]], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Sequences -> (tokens end to end, lengths)."""
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    tokens = np.fromiter(itertools.chain.from_iterable(sequences), dtype=dtype, count=int(lengths.sum()))
    return tokens, lengths


def sequence_lengths(offsets: np.ndarray, block: int = 1 << 20) -> np.ndarray:
    """(N,) the lengths of the sequences `offsets` bounds, for batching: the one part of the index
    held in memory, 2 bytes per sequence (4 beyond 65,535 tokens). Computed a block at a time, so
    that no 8-byte array of the corpus's size is made on the way."""
    count = len(offsets) - 1
    longest = 0
    for i in range(0, count, block):
        lengths = np.diff(offsets[i : i + block + 1])
        if lengths.min() < 0:  # hand-edited: unchecked, a negative length would wrap to 65,5xx tokens
            raise ValueError(f"offset {i + int(lengths.argmin()) + 1} is below the one before it")
        longest = max(longest, int(lengths.max()))
    lengths = np.empty(count, dtype=np.uint16 if longest <= np.iinfo(np.uint16).max else np.int32)
    for i in range(0, count, block):
        lengths[i : i + block] = np.diff(offsets[i : i + block + 1])
    return lengths


def load_array(path: Path) -> np.ndarray:
    """A data dir's .npy file, memory-mapped; a missing or damaged one (an empty file too) is a
    one-line error."""
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise DataError(f"cannot read {path} ({first_line(e)}); run nmt prepare again") from None


class TokenArray:
    """A list of token sequences stored as one flat array plus offsets; the tokens stay on disk
    (memory-mapped) and are read as batches need them."""

    def __init__(self, directory: Path, stem: str, vocab_size: int | None = None):
        """`vocab_size`: refuse ids outside a vocabulary of that many pieces (read once, now: an
        id past the embedding table would stop training with an IndexError mid-run)."""
        self.tokens = load_array(Path(directory) / f"{stem}.tokens.npy")
        self.offsets = load_array(Path(directory) / f"{stem}.offsets.npy")
        if (self.offsets.ndim != 1 or len(self.offsets) < 1 or int(self.offsets[0]) != 0
                or int(self.offsets[-1]) != len(self.tokens)):
            raise DataError(f"{Path(directory) / stem}: tokens and offsets do not match; run nmt prepare again")
        try:
            self.lengths = sequence_lengths(self.offsets)
        except ValueError as e:
            raise DataError(f"{Path(directory) / stem}: {e}; run nmt prepare again") from None
        if vocab_size is not None and (largest := int(self.tokens.max(initial=0))) >= vocab_size:
            raise DataError(f"{Path(directory) / stem}: token id {largest} is outside the vocabulary of {vocab_size} "
                            "pieces; run nmt prepare again")
        self.release_pages()

    def release_pages(self) -> None:
        """Unmap the token and offset pages read so far (they stay in the page cache). Batches read
        sentences all over the file, and each page fault maps its neighbours too: without this
        the whole file would end up counted in this process's resident memory."""
        for array in (self.tokens, self.offsets):
            mapping = getattr(array, "_mmap", None)
            if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                mapping.madvise(mmap.MADV_DONTNEED)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]


# ---------------------------------------------------------------------------------------------
# Encoding text into token files with all cores

_worker_models: list = []


def _load_worker_models(models: list[str]) -> None:
    import sentencepiece as spm

    _worker_models.clear()
    for path in models:
        processor = spm.SentencePieceProcessor()
        processor.load(path)
        _worker_models.append((processor, reserved_ids(processor)))


def _encode_chunk(rows: list[tuple[str, ...]], dtype: str, prefixes: list[list[int]] | None = None,
                  prefixed_from: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each side of the rows encoded with its model, the rows from `prefixed_from` on after that
    side's `prefixes` ids (a language tag): [(tokens, lengths), ...]."""
    encoded = []
    for side, (processor, reserved) in enumerate(_worker_models):
        sequences = encode_text(processor, [row[side] for row in rows], reserved)  # none spelled in the text
        if prefixes and prefixes[side]:
            sequences = [ids if i < prefixed_from else prefixes[side] + ids for i, ids in enumerate(sequences)]
        encoded.append(flatten(sequences, np.dtype(dtype)))
    return encoded


def worker_count(requested: int = 0) -> int:
    """`requested`, or the cores this process may use."""
    if requested > 0:
        return requested
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def encode_to_token_files(
    chunks: Iterable[list[tuple[str, ...]]],
    models: list[Path],
    directory: Path,
    stems: list[str],
    dtype: np.dtype,
    workers: int = 1,
    on_chunk=lambda rows: None,
    prefixes: list[list[int]] | None = None,
    prefixed_from: int = 0,
) -> list[dict]:
    """Encode chunks of rows of texts (one per side: (source, target) pairs, or 1-tuples of
    monolingual sentences) into one token file per side, STEMS[i], with MODELS[i], in order;
    `prefixes[i]`: ids that start every sequence of side i from row `prefixed_from` on (a tag on
    every row, or on a tail of them).

    With more than one worker, chunks are encoded in worker processes, a bounded number at a
    time, so memory holds a few chunks whatever the corpus size. Returns the counts of each side.
    """
    writers = [TokenFileWriter(directory, stem, dtype) for stem in stems]

    def write(result, size: int) -> None:
        for writer, (tokens, lengths) in zip(writers, result):
            writer.append(tokens, lengths)
        on_chunk(size)

    def starts(chunks: Iterable[list]) -> Iterator[tuple[list, int]]:  # each chunk, and its first prefixed row
        first_row = 0
        for chunk in chunks:
            yield chunk, max(0, prefixed_from - first_row)
            first_row += len(chunk)

    paths = [str(model) for model in models]
    if workers <= 1:
        _load_worker_models(paths)
        try:
            for chunk, start in starts(chunks):
                write(_encode_chunk(chunk, dtype.str, prefixes, start), len(chunk))
        finally:
            _worker_models.clear()
    else:
        # spawn: workers start clean (no copy of a parent that may hold torch's threads)
        with ProcessPoolExecutor(
            workers, mp_context=get_context("spawn"), initializer=_load_worker_models, initargs=(paths,),
        ) as pool:
            pending: deque = deque()
            for chunk, start in starts(chunks):
                pending.append((pool.submit(_encode_chunk, chunk, dtype.str, prefixes, start), len(chunk)))
                if len(pending) >= 2 * workers:
                    future, size = pending.popleft()
                    write(future.result(), size)
            while pending:
                future, size = pending.popleft()
                write(future.result(), size)
    return [writer.close() for writer in writers]


def chunked(items: Iterator, size: int) -> Iterator[list]:
    while chunk := list(itertools.islice(items, size)):
        yield chunk

