"""Dropout with a cheap random mask on the CPU.

torch draws a CPU dropout mask with one Mersenne Twister number per element: on 2 AVX2 cores that
takes 24 ms for a (2500, 1024) activation, more than the matrix product that made it (9 ms), and
a sixth of a training update of the Multi30k CPU Transformer. Here the mask comes from numpy's
SFC64 generator, 16 random bits per element (a few ms). Its seed is drawn from torch's generator,
so `torch.manual_seed` and the random state that training saves still decide every mask. Other
devices keep torch's dropout, whose kernels draw their own counter-based numbers, and so does a
model that torch.compile traces: numpy's generator would split its graph at every dropout.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def cpu_keep_multiplier(shape: torch.Size, p: float, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `shape`: 0 with probability p (rounded to a multiple of 2^-16), else 1/(1-p)."""
    count = math.prod(shape)
    seed = int(torch.randint(0, 2**63 - 1, ()))
    words = np.random.SFC64(seed).random_raw((count + 3) // 4)  # 64 random bits = 4 × 16
    bits = torch.from_numpy(words.view(np.int16)[:count]).view(shape)  # uniform on [-2^15, 2^15)
    keep = bits >= round(p * 65536) - 32768  # P(keep) = 1 - round(p * 2^16) / 2^16
    # Through uint8: bool-to-float conversion is not vectorized on the CPU, uint8-to-float is.
    return keep.view(torch.uint8).to(dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Module):
    """`nn.Dropout`'s behaviour (zero each element with probability p while training, scale the
    rest by 1/(1-p)); on the CPU its mask is drawn as the module docstring says."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), not {p}")
        self.p = p
        self.cpu_mask = True  # False: torch's own mask on the CPU too (`nmt bench`'s plain baseline)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or not self.cpu_mask or torch.compiler.is_compiling():
            return F.dropout(x, self.p, True)
        return x * cpu_keep_multiplier(x.shape, self.p, x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_torch_masks(model: nn.Module) -> None:
    """Every `Dropout` of `model` draws torch's own mask on the CPU too (`nmt bench`'s plain baseline)."""
    for module in model.modules():
        if isinstance(module, Dropout):
            module.cpu_mask = False
