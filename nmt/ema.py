"""An exponential moving average of a model's weights during training (`train.ema_decay`,
Marian's exponential smoothing).

After every update each averaged weight moves a fraction 1 - decay towards the trained one. With
it on, validation scores the averaged weights and every checkpoint's `model.safetensors` holds
them (what translate, average and export read); `last/` keeps the trained weights beside the
optimizer state to resume from, as `training_weights`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from nmt.errors import CheckpointError


def ema_decay_at(step: int, decay: float) -> float:
    """The decay after update `step`: lower at first, so that the average soon forgets the
    random initial weights (TensorFlow's ExponentialMovingAverage with num_updates)."""
    return min(decay, (1 + step) / (10 + step))


class WeightAverage:
    """The moving average of `model`'s parameters (shared ones once), in fp32."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.averaged = [p.detach().float().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move the average towards `model`'s weights after update `step`."""
        weight = 1.0 - ema_decay_at(step, self.decay)
        # One fused update over every tensor: on a GPU a loop would launch kernels per parameter.
        torch._foreach_lerp_(self.averaged, [p.detach().float() for p in model.parameters()], weight)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module):
        """`model` holds the averaged weights inside the block, its trained ones again after it."""
        params = list(model.parameters())
        trained = [p.detach().clone() for p in params]
        with torch.no_grad():
            for param, average in zip(params, self.averaged):
                param.copy_(average)
        try:
            yield model
        finally:
            with torch.no_grad():
                for param, weights in zip(params, trained):
                    param.copy_(weights)


def trained_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s parameters by name (shared ones once), on the CPU: what `last/` keeps to resume
    when its model.safetensors holds the average."""
    # A copy even on the CPU: the model's tensors change when the average is swapped in to save it.
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in model.named_parameters()}


@torch.no_grad()
def load_trained_weights(model: nn.Module, weights: dict[str, torch.Tensor], directory: Path) -> None:
    """Put the trained weights `last/` kept (`directory`) back into `model` to resume training."""
    for name, param in model.named_parameters():
        if name not in weights or weights[name].shape != param.shape:
            raise CheckpointError(f"{directory}: the trained weights do not match the model (first: {name})")
        param.copy_(weights[name])
