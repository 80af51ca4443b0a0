"""Ensembles: several translation models that decode as one. At each step the models' next-token
distributions are averaged, and search sees the log of the mean (as fairseq does). Each model
keeps its own memory and state, reordered together with the beams; any mix of architectures
works, since each is used only through the model interface."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from nmt.errors import CheckpointError
from nmt.files import VocabInfo
from nmt.interfaces import DecoderState, Reorderable, StepDecoder
from nmt.models.attention import AttentionChoice


@dataclass
class EnsembleMemory:
    members: list[Reorderable]  # one per model

    def reorder(self, indices: torch.Tensor) -> EnsembleMemory:
        return EnsembleMemory([memory.reorder(indices) for memory in self.members])


@dataclass
class EnsembleState:
    members: list[DecoderState]
    attention: torch.Tensor | None = None  # (B, S) the first model's, when asked for

    def reorder(self, indices: torch.Tensor) -> EnsembleState:
        return EnsembleState(
            [state.reorder(indices) for state in self.members],
            None if self.attention is None else self.attention.index_select(0, indices),
        )


class Ensemble:
    """Models sharing one vocabulary, as one step decoder: log of the mean of their probabilities.
    With `attention`, the first model's cross-attention weights stand for the ensemble's."""

    def __init__(self, models: Sequence[StepDecoder]):
        self.models = list(models)

    def with_members(self, change: Callable[[StepDecoder], StepDecoder]) -> Ensemble:
        """The ensemble of each model changed (decoding with fixed-shape steps, say)."""
        return Ensemble([change(model) for model in self.models])

    def encode(self, src: torch.Tensor) -> EnsembleMemory:
        return EnsembleMemory([model.encode(src) for model in self.models])

    def init_state(self, memory: EnsembleMemory, attention: AttentionChoice | None = None) -> EnsembleState:
        first = self.models[0].init_state(memory.members[0], attention)
        others = [model.init_state(part) for model, part in zip(self.models[1:], memory.members[1:])]
        return EnsembleState([first, *others])

    def decode_step(
        self, prev_tokens: torch.Tensor, memory: EnsembleMemory, state: EnsembleState
    ) -> tuple[torch.Tensor, EnsembleState]:
        steps = [model.decode_step(prev_tokens, part, own) for model, part, own in zip(self.models, memory.members, state.members)]
        log_probs = torch.stack([log_probs for log_probs, _ in steps])  # (M, B, V)
        mean = torch.logsumexp(log_probs, dim=0) - math.log(len(steps))  # (B, V) log of the mean probability
        states = [new for _, new in steps]
        return mean, EnsembleState(states, states[0].attention)


def shared_vocabulary(model_dirs: Sequence[Path]) -> VocabInfo:
    """The vocab.json the models share; a one-line error naming the first difference otherwise."""
    for model_dir in model_dirs:
        if not Path(model_dir).is_dir():
            raise CheckpointError(f"checkpoint directory not found: {model_dir}")
    first_dir = Path(model_dirs[0])
    first = VocabInfo.read(first_dir)
    for other_dir in model_dirs[1:]:
        other = VocabInfo.read(other_dir)
        difference = _first_difference(first, other)
        if difference:
            raise CheckpointError(
                f"{other_dir} cannot join an ensemble with {first_dir}: {difference}; the models of an "
                "ensemble need one vocabulary"
            )
    return first


def _first_difference(a: VocabInfo, b: VocabInfo) -> str:
    for side, name in (("src", "source"), ("tgt", "target")):
        lang_a, lang_b = (a.src_lang, b.src_lang) if side == "src" else (a.tgt_lang, b.tgt_lang)
        if lang_a and lang_b and lang_a != lang_b:
            return f"the {name} languages differ ({lang_a} and {lang_b})"
        size_a, size_b = a.vocab.size(side), b.vocab.size(side)
        if size_a != size_b:
            return f"the {name} vocabularies differ in size ({size_a} and {size_b} pieces)"
        if a.vocab.sha256(side) != b.vocab.sha256(side):
            return f"the {name} SentencePiece models differ (same size, other pieces)"
    if a.normalization["src"] != b.normalization["src"]:
        return "their source text is normalized differently"
    return ""
