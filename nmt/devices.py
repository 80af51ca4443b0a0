"""Choosing the device and the numeric precision."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools

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


def keep_freed_memory() -> bool:
    """Let this process keep the memory it frees for its next allocations (glibc only).

    glibc hands blocks over 32 MiB back to the kernel as soon as they are freed, and trims the
    heap when its free top grows; the next tensor of that size then faults in every page afresh.
    A CPU training update allocates and frees such tensors dozens of times (the (tokens, vocab)
    logits and their gradients): 171 million page faults and 439 s of system time in a 35-minute
    run of the Multi30k CPU recipe. Without mmap'd blocks and trimming, freed memory is reused;
    resident memory stays at its peak instead. Returns whether the C library took the settings.
    """
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is None:  # not glibc (musl, macOS): nothing to tune
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # from glibc's malloc.h
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # config name -> autocast dtype


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: "auto" is bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if gpu_has_bf16(device) else torch.float16
    return PRECISIONS[precision]


def gpu_has_bf16(device: torch.device) -> bool:
    """Whether this GPU multiplies bf16 in hardware (Ampere and later). torch's own
    is_bf16_supported() also says yes where bf16 is only emulated, far slower than fp16."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


@functools.cache  # read once: an RNN asks at every decoding step under autocast
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The instruction-set flags of this CPU as Linux lists them ("flags" on x86, "Features" on
    ARM); empty where they can't be read."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f
                                   if line.startswith(("flags", "Features"))), []))
    except (OSError, UnicodeDecodeError, IndexError):
        return frozenset()


# The flags of the instructions that multiply half-precision matrices in hardware: AVX512_BF16
# (AMD Zen 4 and later, Intel Cooper Lake), AMX (Intel Sapphire Rapids and later), AVX512_FP16,
# and ARM's BF16 extension (Neoverse V1 and later).
NATIVE_HALF_FLAGS = {torch.bfloat16: {"avx512_bf16", "amx_bf16", "bf16"}, torch.float16: {"avx512_fp16", "amx_fp16"}}


def cpu_multiplies_natively(dtype: torch.dtype, flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU has instructions for `dtype` matrix products (fp32: always)."""
    if dtype == torch.float32:
        return True
    return bool(NATIVE_HALF_FLAGS[dtype] & (cpu_flags() if flags is None else flags))


def slow_precision_note(device: torch.device, dtype: torch.dtype) -> str | None:
    """A warning for half-precision autocast on a CPU without instructions for it (fp16 matrix
    products on an AMD EPYC with AVX512_BF16 but no fp16: 1.0 GFLOP/s against 175 for fp32)."""
    if device.type != "cpu" or dtype == torch.float32:
        return None
    flags = cpu_flags()
    if not flags or cpu_multiplies_natively(dtype, flags):  # no flags: nothing to go by
        return None
    name = next(name for name, named in PRECISIONS.items() if named == dtype)
    return (f"warning: this CPU has no {name} matrix instructions; its {name} products are emulated and can be "
            f"far slower than fp32 (train.precision fp32)")


def needs_loss_scaling(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether training under autocast to `dtype` needs a gradient scaler: fp16 does, and so does
    bf16 on a GPU for a model with recurrent layers, since CUDA's autocast runs cuDNN's RNN
    kernels in fp16 whatever dtype it was given (PyTorch's AutocastRNN.cpp), and their small
    gradients would underflow unscaled."""
    if dtype == torch.float16:
        return True
    recurrent = any(isinstance(module, torch.nn.RNNBase) for module in model.modules())
    return device.type == "cuda" and dtype != torch.float32 and recurrent


def grad_scaler(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler | None:
    """A gradient scaler where training `model` under `dtype` needs one (`needs_loss_scaling`)."""
    return torch.amp.GradScaler(device.type) if needs_loss_scaling(model, device, dtype) else None


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
