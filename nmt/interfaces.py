"""The contracts between the parts of the toolkit, as Protocols: what search asks of a model and
its memory and state, and what the training loop asks of a task and its batches. Any object
with these methods fits; none inherits from them.

    model.encode(src) -> memory                       src (B, S) token ids, padded with PAD
    model.init_state(memory, attention=None) -> state
    model.decode_step(prev, memory, state) -> (log_probs, state)    prev (B,), log_probs (B, V)
    model.decode(tgt_in, memory) -> logits            teacher forced: (B, T) -> (B, T, V)
    model(src, tgt_in) -> logits                      decode(tgt_in, encode(src))

Memory and state select (and repeat) batch rows with `reorder(indices)`, as beam search needs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch

if TYPE_CHECKING:
    from typing_extensions import Self

    from nmt.config import Config
    from nmt.models.attention import AttentionChoice


@runtime_checkable
class Reorderable(Protocol):
    """Encoder memory or decoder state: per-row tensors that follow the beams."""

    def reorder(self, indices: torch.Tensor) -> Self: ...


@runtime_checkable
class DecoderState(Reorderable, Protocol):
    # (B, S) the cross-attention weights of the last step, when init_state was given a choice
    attention: torch.Tensor | None


@runtime_checkable
class StepDecoder(Protocol):
    """What search uses: a model, or a wrapper of one (the plain full-prefix decoder)."""

    def encode(self, src: torch.Tensor) -> Reorderable: ...

    def init_state(self, memory: Reorderable, attention: AttentionChoice | None = None) -> DecoderState: ...

    def decode_step(
        self, prev_tokens: torch.Tensor, memory: Reorderable, state: DecoderState
    ) -> tuple[torch.Tensor, DecoderState]: ...


@runtime_checkable
class TranslationModel(StepDecoder, Protocol):
    """Every translation model (Transformer, RNN-attention): incremental and teacher-forced."""

    def decode(self, tgt_in: torch.Tensor, memory: Reorderable) -> torch.Tensor: ...

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class TrainingBatch(Protocol):
    """A batch of the training loop: its loss is averaged over `num_tgt_tokens`."""

    num_tgt_tokens: int
    num_src_tokens: int

    def to(self, device: torch.device) -> Self: ...

    def halves(self) -> list[Self]: ...  # for the out-of-memory retry


@runtime_checkable
class TrainingTask(Protocol):
    """What the training loop needs to know about a task (translation, masked-LM pretraining)."""

    config: Config
    metric: str  # the key of the dev score that picks best/
    metric_name: str
    extra_metrics: tuple[str, ...]  # other dev figures to print
    throughput: str  # the log figure the progress bar shows as tok/s

    def describe(self) -> str: ...

    def build_model(self) -> torch.nn.Module: ...

    def initialize(self, model: torch.nn.Module, resume: bool, log: Callable[[str], None]) -> list[torch.nn.Parameter]: ...

    def epoch_batches(self, batch_tokens: int, epoch: int) -> list[np.ndarray]: ...

    def make_batch(self, indices: np.ndarray, pin_memory: bool, epoch: int, number: int) -> TrainingBatch: ...

    def update_tokens(self, update: list[np.ndarray]) -> int | None: ...

    def release_pages(self) -> None: ...

    def loss(self, model: torch.nn.Module, batch: TrainingBatch, label_smoothing: float) -> torch.Tensor: ...

    def validate(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> dict: ...

    def check_resumable(self, save_dir: Path) -> None: ...

    def init_save_dir(self, save_dir: Path) -> None: ...
