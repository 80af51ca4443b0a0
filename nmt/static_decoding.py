"""Incremental decoding with fixed shapes, replayed as a CUDA graph on a GPU.

A plain decoder step grows its keys/values by one position (a new tensor each step) and its
batch shrinks as sentences finish, so every step launches its kernels anew, one by one, from
Python. `StaticDecoding` wraps a model with the `StaticStepModel` methods (the Transformer):
all steps run on buffers of one shape (rows, source and output lengths rounded up to buckets),
a smaller batch or a shorter source uses their first rows and columns, so one step is captured
once as a CUDA graph and replayed with a single launch, batch after batch. On a CPU, or when
capture fails, the same fixed-shape step runs eagerly. Search does not know the difference: it
is a `StepDecoder` like the model.

Its memory and state share the buffers: `reorder` moves rows inside them, and the object it was
called on is not used again (search always goes on with the reordered one).
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from nmt.errors import first_line
from nmt.interfaces import Reorderable, StepDecoder
from nmt.models.attention import AttentionChoice

# What the buffers did in this process: graphs captured, captures that failed, steps replayed
# and steps run eagerly (bench reports them, so that a fallback is seen).
GRAPH_COUNTS: Counter = Counter()
# Buffers (and graphs) kept per model, the most recently used: on a GPU enough for the batch
# shapes of a test set; fewer elsewhere, where beam buffers of thousands of rows cost memory.
CACHED_SHAPES_CUDA = 8
CACHED_SHAPES = 4


class MaskedMemory(Reorderable, Protocol):
    mask: torch.Tensor  # (B, S) True at real source tokens


@runtime_checkable
class StaticStepModel(Protocol):
    """A model that can decode one step on fixed-shape buffers (see Transformer.static_step)."""

    def encode(self, src: torch.Tensor) -> MaskedMemory: ...

    def static_memory(self, memory: MaskedMemory, rows: int, source_length: int) -> MaskedMemory: ...

    def load_static_memory(self, buffers: MaskedMemory, memory: MaskedMemory) -> None: ...

    def static_buffers(self, rows: int, length: int, memory: MaskedMemory) -> list[tuple[torch.Tensor, torch.Tensor]]: ...

    def static_step(self, prev_tokens: torch.Tensor, memory, buffers: list, position: torch.Tensor,
                    attention: AttentionChoice | None = None) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def resolve_attention(self, attention: AttentionChoice | None) -> AttentionChoice | None: ...


@runtime_checkable
class MemberDecoders(Protocol):
    """A step decoder made of others (an ensemble), rebuilt with each of them changed."""

    def with_members(self, change: Callable[[StepDecoder], StepDecoder]) -> StepDecoder: ...


def with_fixed_shapes(model: StepDecoder, length: int) -> StepDecoder:
    """`model` decoding outputs of up to `length` tokens with fixed-shape steps where it can:
    itself, or each of its members that can (the others as they are)."""
    if isinstance(model, StaticStepModel):  # capabilities, not model types
        return StaticDecoding(model, length)
    if isinstance(model, MemberDecoders):
        return model.with_members(lambda member: with_fixed_shapes(member, length))
    return model


def bucket(size: int, step: int) -> int:
    return -(-size // step) * step


class Buffers:
    """Everything one captured step reads and writes: `capacity` rows of a source of up to
    `source_length` tokens and outputs of up to `length` tokens."""

    def __init__(self, model: StaticStepModel, memory, capacity: int, source_length: int, length: int,
                 attention: AttentionChoice | None, half: torch.dtype | None = None):
        # (No reference to the model: the cache of buffers is keyed by it, weakly.)
        self.capacity, self.source_length = capacity, source_length
        self.memory = model.static_memory(memory, capacity, source_length)
        device = memory.mask.device
        self.caches = model.static_buffers(capacity, length, memory)
        self.prev = torch.zeros(capacity, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.attention = attention
        self.source = None  # the memory object whose rows the buffers hold
        self.rows = 0  # rows of that memory
        self.columns = 0  # its source length
        self.half = half  # the autocast dtype the step runs under (None: full precision)
        self.graph = None  # torch.cuda.CUDAGraph, once captured
        self.outputs: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def load_memory(self, model: StaticStepModel, memory) -> None:
        """Copy `memory`'s rows into the first rows (masking the columns past its source), unless
        they are there already."""
        if memory is self.source:
            return
        model.load_static_memory(self.memory, memory)
        self.source, (self.rows, self.columns) = memory, memory.mask.shape

    def move_rows(self, indices: torch.Tensor) -> None:
        """Row i of the caches becomes what row indices[i] was (beams follow their parents)."""
        for keys, values in self.caches:
            keys[: len(indices)].copy_(keys.index_select(0, indices))
            values[: len(indices)].copy_(values.index_select(0, indices))


@dataclass
class StaticState:
    buffers: Buffers
    rows: int  # rows in use
    step: int  # position of the next token
    attention: torch.Tensor | None = None  # (rows, S) the kept weights of the last step

    def reorder(self, indices: torch.Tensor) -> StaticState:
        self.buffers.move_rows(indices)
        kept = None if self.attention is None else self.attention.index_select(0, indices)
        return StaticState(self.buffers, len(indices), self.step, kept)


_buffers_of: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> OrderedDict(shape -> Buffers)


class StaticDecoding:
    """`model` as a `StepDecoder` whose steps have fixed shapes, for outputs of up to `length`
    tokens; on CUDA each step is a replayed CUDA graph, unless capture fails (then, for the
    rest of the process, decoding goes on without graphs)."""

    capture_failed = False

    def __init__(self, model: StaticStepModel, length: int):
        self.model, self.length = model, length

    def encode(self, src: torch.Tensor):
        return self.model.encode(src)

    def init_state(self, memory, attention: AttentionChoice | None = None) -> StaticState:
        buffers = self._buffers(memory, self.model.resolve_attention(attention))
        buffers.load_memory(self.model, memory)
        return StaticState(buffers, memory.mask.shape[0], 0)

    def decode_step(self, prev_tokens: torch.Tensor, memory, state: StaticState) -> tuple[torch.Tensor, StaticState]:
        buffers, rows = state.buffers, prev_tokens.shape[0]
        if state.step >= self.length:
            raise ValueError(f"step {state.step + 1} of outputs decoded for {self.length} tokens at most")
        buffers.load_memory(self.model, memory)
        buffers.prev[:rows].copy_(prev_tokens)
        buffers.position.fill_(state.step)
        if buffers.graph is not None:
            buffers.graph.replay()
            log_probs, attention = buffers.outputs
            GRAPH_COUNTS["replayed_steps"] += 1
        else:
            log_probs, attention = self._step(buffers)
            GRAPH_COUNTS["eager_steps"] += 1
        # The outputs live in the buffers and change at the next step: search changes log-probs
        # within a step only, but keeps the attention of every step.
        kept = None if attention is None else attention[:rows, : buffers.columns].clone()
        return log_probs[:rows], StaticState(buffers, rows, state.step + 1, kept)

    def _buffers(self, memory, attention: AttentionChoice | None) -> Buffers:
        """The model's buffers for this batch's bucket of shapes (made, and captured, on first use)."""
        rows, columns = memory.mask.shape
        device = memory.mask.device
        half = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        shape = (device, half, 1 << (rows - 1).bit_length(), bucket(columns, 16), bucket(self.length, 16), attention)
        cache = _buffers_of.setdefault(self.model, OrderedDict())
        if shape in cache:
            cache.move_to_end(shape)
            return cache[shape]
        buffers = None
        try:
            buffers = Buffers(self.model, memory, *shape[2:], half=half)
        except torch.OutOfMemoryError:
            pass
        if buffers is None:  # out of memory: the other shapes' buffers make room for this one's
            # (outside the except block, whose traceback holds the failed attempt's tensors)
            cache.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            buffers = Buffers(self.model, memory, *shape[2:], half=half)
        if self.graphs_on(device) and not StaticDecoding.capture_failed:
            self.capture(buffers)
        cache[shape] = buffers
        while len(cache) > (CACHED_SHAPES_CUDA if device.type == "cuda" else CACHED_SHAPES):
            cache.popitem(last=False)
        return buffers

    def graphs_on(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def _step(self, buffers: Buffers) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.model.static_step(buffers.prev, buffers.memory, buffers.caches, buffers.position, buffers.attention)

    def capture(self, buffers: Buffers) -> None:
        """Record one step as a CUDA graph after two warm-up runs on a side stream (what CUDA
        graphs need). Under autocast, the graph casts the weights itself: autocast's cache of
        cast weights is emptied when its region ends, and a graph outlives the region."""
        device, half = buffers.prev.device, buffers.half
        try:
            uncached = torch.autocast(device.type, dtype=half, cache_enabled=False) if half else contextlib.nullcontext()
            # On the model's device, not the current one (--device cuda:1): a capture on another
            # device's stream records nothing, and replaying the empty graph would give stale steps.
            with torch.cuda.device(device), uncached:
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._step(buffers)
                torch.cuda.current_stream(device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # thread_local: the training loop's batch thread may pin memory while a step is
                # captured for validation, which the default (global) mode would count as an error.
                with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                    buffers.outputs = self._step(buffers)
            buffers.graph = graph
            GRAPH_COUNTS["captured"] += 1
        except RuntimeError as e:  # an operation capture does not allow, or out of memory
            buffers.graph, buffers.outputs = None, None
            StaticDecoding.capture_failed = True
            GRAPH_COUNTS["failed"] += 1
            print(f"warning: CUDA graph capture failed ({first_line(e)}); decoding goes on without it", file=sys.stderr)
