"""Token-bucketed batches of a prepared split, padded into tensors, built ahead of training."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from nmt.data import ParallelSplit
from nmt.tokenizer import BOS, EOS, FIRST_REGULAR_ID, PAD, UNK


def token_batches(
    src_lengths: np.ndarray,
    tgt_lengths: np.ndarray,
    batch_tokens: int,
    seed: int | None = None,
) -> list[np.ndarray]:
    """Group sentence indices into batches of similar length.

    A batch holds as many sentences as fit `batch_tokens` padded tokens, counting the longer
    side plus its BOS/EOS. With a seed, ties in length are broken at random and the batch order
    is shuffled, so each epoch sees different batches; without one, the order is by length.
    """
    sizes = np.maximum(src_lengths, tgt_lengths).astype(np.int32)
    sizes += 1
    rng = np.random.default_rng(seed) if seed is not None else None
    index_type = np.int32 if len(sizes) < 2**31 else np.int64  # half the memory for millions of sentences
    order = np.arange(len(sizes), dtype=index_type)
    if rng is not None:
        rng.shuffle(order)  # in place: rng.permutation's order, without its 8-byte copy
    order = sorted_by_size(order, sizes)
    # Sorted by size, a batch is a run of sentences; fill runs greedily, one size at a time
    # (a few hundred sizes, not millions of sentences): a batch holds `capacity` sentences of
    # its longest size, and one that is not full takes sentences of the next size.
    counts = np.bincount(sizes)
    values = np.flatnonzero(counts)
    counts = counts[values]
    starts: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
    position, in_batch = 0, 0  # sentences placed so far; of them, in the open batch
    for size, count in zip(values.tolist(), counts.tolist()):
        capacity = max(1, batch_tokens // size)
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


def sorted_by_size(order: np.ndarray, sizes: np.ndarray, block: int = 1 << 20) -> np.ndarray:
    """`order` (a permutation of the sentences) sorted stably by `sizes[order]`, as
    `order[np.argsort(sizes[order], kind="stable")]` is, but as a counting sort a block at a
    time: memory holds no 8-byte index of the corpus's size, only the result."""
    counts = np.bincount(sizes)
    next_slot = np.concatenate([[0], np.cumsum(counts)[:-1]])  # where each size's sentences go next
    out = np.empty_like(order)
    for start in range(0, len(order), block):
        part = order[start : start + block]
        keys = sizes[part]
        within = np.argsort(keys, kind="stable")
        part, keys = part[within], keys[within]
        values, first, counts = np.unique(keys, return_index=True, return_counts=True)
        for size, at, count in zip(values.tolist(), first.tolist(), counts.tolist()):
            out[next_slot[size] : next_slot[size] + count] = part[at : at + count]
            next_slot[size] += count
    return out


@dataclass
class Batch:
    src: torch.Tensor  # (B, S) source ids + EOS, padded with PAD
    tgt_in: torch.Tensor  # (B, T) BOS + target ids
    tgt_out: torch.Tensor  # (B, T) target ids + EOS
    num_tgt_tokens: int  # real (non-pad) tokens in tgt_out
    num_src_tokens: int = 0
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def to(self, device: torch.device) -> Batch:
        non_blocking = device.type == "cuda"
        return Batch(
            self.src.to(device, non_blocking=non_blocking),
            self.tgt_in.to(device, non_blocking=non_blocking),
            self.tgt_out.to(device, non_blocking=non_blocking),
            self.num_tgt_tokens,
            self.num_src_tokens,
            self.indices,
        )

    def halves(self) -> list[Batch]:
        """The batch as two halves by sentences (one sentence stays one batch)."""
        half = self.src.shape[0] // 2
        if half == 0:
            return [self]
        parts = []
        for rows in (slice(0, half), slice(half, None)):
            src, tgt_in, tgt_out = self.src[rows], self.tgt_in[rows], self.tgt_out[rows]
            parts.append(Batch(
                src, tgt_in, tgt_out, num_tgt_tokens=int((tgt_out != PAD).sum()),
                num_src_tokens=int((src != PAD).sum()), indices=self.indices[rows],
            ))
        return parts


def pad_source(sequences: list[np.ndarray] | list[list[int]]) -> torch.Tensor:
    """Source ids + EOS, right-padded: (B, S)."""
    width = max(len(s) for s in sequences) + 1
    out = np.full((len(sequences), width), PAD, dtype=np.int64)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = seq
        out[row, len(seq)] = EOS
    return torch.from_numpy(out)


def drop_source_tokens(src: torch.Tensor, fraction: float, rng: np.random.Generator, kept: tuple[int, ...] = ()) -> torch.Tensor:
    """Word dropout: each regular source token becomes UNK with probability `fraction`, so that
    the model learns not to lean on any one word. PAD, EOS, the other special ids and the ids in
    `kept` (a multilingual model's language tags) stay."""
    ids = src.numpy()
    dropped = (ids >= FIRST_REGULAR_ID) & (rng.random(ids.shape) < fraction)  # (B, S)
    if kept:
        dropped &= ~np.isin(ids, kept)
    return torch.from_numpy(np.where(dropped, UNK, ids))


def make_batch(
    split: ParallelSplit, indices: np.ndarray, pin_memory: bool = False,
    word_dropout: float = 0.0, rng: np.random.Generator | None = None, kept: tuple[int, ...] = (),
) -> Batch:
    """A training batch; with `word_dropout`, that share of the source tokens (not the ids in
    `kept`) is replaced by UNK (drawn with `rng`)."""
    src = pad_source([split.src[i] for i in indices])
    if word_dropout:
        src = drop_source_tokens(src, word_dropout, rng, kept)
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
    the one training, so that a GPU does not wait for data. With `ahead` 0 it builds each when
    asked: on a CPU, whose cores the update already keeps busy, a second thread only competes.

    `build(index)` makes the batches of update `index`; `next()` returns them for `first`,
    `first + 1`, ... up to `end`, in order. A failure in `build` is raised by `next()`.
    """

    def __init__(self, build: Callable[[int], list[Batch]], first: int, end: int, ahead: int = 2):
        self.build, self.next_index, self.end = build, first, end
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="batches") if ahead else None
        self.pending: deque[Future] = deque()
        for _ in range(ahead):
            self._submit()

    def _submit(self) -> None:
        if self.pool is not None and self.next_index < self.end:
            self.pending.append(self.pool.submit(self.build, self.next_index))
            self.next_index += 1

    def next(self) -> list[Batch]:
        if self.pool is None:
            self.next_index += 1
            return self.build(self.next_index - 1)
        future = self.pending.popleft()
        self._submit()
        return future.result()

    def __enter__(self) -> BatchPrefetcher:
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
