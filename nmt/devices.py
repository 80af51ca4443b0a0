"""Choosing the device and the numeric precision."""

from __future__ import annotations

import contextlib

import torch

from nmt.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" picks the GPU when there is one; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} was asked for, but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} was asked for, but there are {torch.cuda.device_count()} GPUs")
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device {name!r} (use auto, cpu, cuda or cuda:N)")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: "auto" is bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
