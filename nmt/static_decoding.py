"""Incremental decoding with fixed shapes, replayed as a CUDA graph on a GPU.

A plain decoder step grows its keys/values by one position (a new tensor each step) and its
batch shrinks as sentences finish, so every step launches its kernels anew, one by one, from
Python. `StaticDecoding` wraps a model with `static_buffers`/`static_step` (the Transformer):
all steps of a batch run on the same buffers, whose rows are the batch's (a smaller batch uses
the first rows), so one step is captured once as a CUDA graph and replayed with a single launch.
On a CPU, or when capture fails, the same fixed-shape step runs eagerly. Search does not know
the difference: it is a `StepDecoder` like the model.

Its memory and state share the buffers: `reorder` moves rows inside them, and the object it was
called on is not used again (search always goes on with the reordered one).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from nmt.models.attention import AttentionChoice


@runtime_checkable
class StaticStepModel(Protocol):
    """A model that can decode one step on fixed-shape buffers (see Transformer.static_step)."""

    def encode(self, src: torch.Tensor): ...

    def static_buffers(self, rows: int, length: int, like: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]: ...

    def static_step(self, prev_tokens: torch.Tensor, memory, buffers: list, position: torch.Tensor,
                    attention: AttentionChoice | None = None) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def resolve_attention(self, attention: AttentionChoice | None) -> AttentionChoice | None: ...


class Buffers:
    """Everything one captured step reads and writes, for `capacity` rows."""

    def __init__(self, model: StaticStepModel, memory, length: int, attention: AttentionChoice | None):
        self.capacity = memory.mask.shape[0]
        self.memory = memory.reorder(torch.arange(self.capacity, device=memory.mask.device))  # a copy of its own
        self.caches = model.static_buffers(self.capacity, length, memory.cross_kv[0][0])
        self.prev = torch.zeros(self.capacity, dtype=torch.long, device=memory.mask.device)
        self.position = torch.zeros(1, dtype=torch.long, device=memory.mask.device)
        self.attention = attention
        self.source = memory  # the memory object whose rows the buffers hold
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def load_memory(self, memory) -> None:
        """Copy `memory`'s rows into the first rows, unless they are there already."""
        if memory is self.source:
            return
        rows = memory.mask.shape[0]
        if rows > self.capacity:
            raise ValueError(f"a batch of {rows} rows in buffers for {self.capacity}")
        self.memory.mask[:rows].copy_(memory.mask)
        for (k, v), (new_k, new_v) in zip(self.memory.cross_kv, memory.cross_kv):
            k[:rows].copy_(new_k)
            v[:rows].copy_(new_v)
        self.source = memory

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


class StaticDecoding:
    """`model` as a `StepDecoder` whose steps have fixed shapes, for outputs of up to `length`
    tokens; on CUDA each step is a replayed CUDA graph (`graphs`), unless capture fails."""

    warned = False  # one warning per process when capture fails

    def __init__(self, model: StaticStepModel, length: int, graphs: bool = True):
        self.model, self.length, self.graphs = model, length, graphs

    def encode(self, src: torch.Tensor):
        return self.model.encode(src)

    def init_state(self, memory, attention: AttentionChoice | None = None) -> StaticState:
        buffers = Buffers(self.model, memory, self.length, self.model.resolve_attention(attention))
        if self.graphs and memory.mask.is_cuda:
            self._capture(buffers)
        return StaticState(buffers, buffers.capacity, 0)

    def decode_step(self, prev_tokens: torch.Tensor, memory, state: StaticState) -> tuple[torch.Tensor, StaticState]:
        buffers, rows = state.buffers, prev_tokens.shape[0]
        if state.step >= self.length:
            raise ValueError(f"step {state.step + 1} of outputs decoded for {self.length} tokens at most")
        buffers.load_memory(memory)
        buffers.prev[:rows].copy_(prev_tokens)
        buffers.position.fill_(state.step)
        if buffers.graph is not None:
            buffers.graph.replay()
            log_probs, attention = buffers.outputs
        else:
            log_probs, attention = self._step(buffers)
        # The outputs live in the buffers and change at the next step: search changes log-probs
        # within a step only, but keeps the attention of every step.
        kept = None if attention is None else attention[:rows].clone()
        return log_probs[:rows], StaticState(buffers, rows, state.step + 1, kept)

    def _step(self, buffers: Buffers) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.model.static_step(buffers.prev, buffers.memory, buffers.caches, buffers.position, buffers.attention)

    def _capture(self, buffers: Buffers) -> None:
        """Record one step as a CUDA graph after two warm-up runs on a side stream (what CUDA
        graphs need); on failure, decoding goes on eagerly with the same buffers."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step(buffers)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                buffers.outputs = self._step(buffers)
            buffers.graph = graph
        except RuntimeError as e:  # an operation capture does not allow, or out of memory
            buffers.graph, buffers.outputs = None, None
            if not StaticDecoding.warned:
                StaticDecoding.warned = True
                print(f"warning: CUDA graph capture failed ({str(e).splitlines()[0]}); decoding without it",
                      file=sys.stderr)
