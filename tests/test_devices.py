import os

import pytest
import torch
from conftest import TINY_RNN, TINY_TRANSFORMER, prepare_toy_data

from nmt import devices
from nmt.config import ModelConfig, config_from_dict
from nmt.devices import cpu_flags, cpu_multiplies_natively, needs_loss_scaling, slow_precision_note
from nmt.errors import ConfigError
from nmt.models import build_model
from nmt.train import train

ZEN4_FLAGS = "fpu sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni"
AVX2_FLAGS = "fpu sse2 avx avx2 fma"


def write_cpuinfo(path, flags: str):
    path.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    return str(path)


def test_cpu_flags_are_read_from_cpuinfo_and_empty_where_it_is_missing(tmp_path):
    assert cpu_flags(write_cpuinfo(tmp_path / "cpuinfo", ZEN4_FLAGS)) == frozenset(ZEN4_FLAGS.split())
    assert cpu_flags(str(tmp_path / "nowhere")) == frozenset()
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert cpu_multiplies_natively(torch.bfloat16, cpu_flags(str(arm)))  # Graviton 3


def test_native_half_precision_follows_the_flags():
    zen4, avx2 = frozenset(ZEN4_FLAGS.split()), frozenset(AVX2_FLAGS.split())
    assert cpu_multiplies_natively(torch.bfloat16, zen4)
    assert cpu_multiplies_natively(torch.bfloat16, avx2 | {"amx_bf16", "amx_tile"})  # Intel Sapphire Rapids
    assert not cpu_multiplies_natively(torch.bfloat16, avx2)
    assert not cpu_multiplies_natively(torch.float16, zen4)  # Zen 4 has no fp16 matrix instructions
    assert cpu_multiplies_natively(torch.float32, frozenset())


def test_auto_precision_is_bf16_only_on_gpus_that_multiply_it(monkeypatch):
    """torch.cuda.is_bf16_supported() also says yes where bf16 is emulated (before Ampere)."""
    from nmt.devices import resolve_precision

    gpu = torch.device("cuda", 0)
    for capability, dtype in (((7, 0), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert resolve_precision("auto", gpu) == dtype
    assert resolve_precision("auto", torch.device("cpu")) == torch.float32


def test_processes_on_the_cpu_need_no_gpus_where_the_machine_has_some(monkeypatch):
    import torch.distributed.run

    from nmt.distributed import start_processes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    started = []
    monkeypatch.setattr(torch.distributed.run, "main", lambda args: started.append((args, os.environ["NMT_LAUNCHER_PID"])))
    monkeypatch.delenv("NMT_LAUNCHER_PID", raising=False)
    assert start_processes(2, ["train"], device="cpu") == 0 and len(started) == 1
    assert started[0][1] == str(os.getpid()) and "NMT_LAUNCHER_PID" not in os.environ  # for the workers only
    monkeypatch.setenv("NMT_LAUNCHER_PID", "123")  # this process a worker of another launcher
    start_processes(2, ["train"], device="cpu")
    assert started[1][1] == str(os.getpid()) and os.environ["NMT_LAUNCHER_PID"] == "123"
    with pytest.raises(ConfigError, match="has 1 GPUs"):
        start_processes(2, ["train"], device="cuda")


def test_loss_scaling_for_fp16_and_for_recurrent_layers_in_bf16_on_a_gpu():
    rnn = build_model(ModelConfig(**TINY_RNN), 20, 20)
    transformer = build_model(ModelConfig(**TINY_TRANSFORMER), 20, 20)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert needs_loss_scaling(rnn, cuda, torch.bfloat16)  # CUDA's autocast runs cuDNN's GRU/LSTM in fp16
    assert not needs_loss_scaling(transformer, cuda, torch.bfloat16)
    assert not needs_loss_scaling(rnn, cpu, torch.bfloat16)  # the CPU's autocast keeps bf16
    assert not needs_loss_scaling(rnn, cuda, torch.float32)
    assert all(needs_loss_scaling(m, d, torch.float16) for m in (rnn, transformer) for d in (cpu, cuda))


def test_half_precision_on_a_cpu_without_instructions_for_it_is_warned_about(monkeypatch):
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset(AVX2_FLAGS.split()))
    cpu = torch.device("cpu")
    assert "no bf16 matrix instructions" in slow_precision_note(cpu, torch.bfloat16)
    assert "no fp16 matrix instructions" in slow_precision_note(cpu, torch.float16)
    assert slow_precision_note(cpu, torch.float32) is None
    assert slow_precision_note(torch.device("cuda"), torch.bfloat16) is None  # GPUs: resolve_precision's "auto"
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset(ZEN4_FLAGS.split()))
    assert slow_precision_note(cpu, torch.bfloat16) is None
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset())  # not Linux: no flags to go by
    assert slow_precision_note(cpu, torch.float16) is None


def test_training_in_bf16_on_such_a_cpu_says_so_once(tmp_path, monkeypatch):
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset(AVX2_FLAGS.split()))
    data_dir = prepare_toy_data(tmp_path, train=60)
    messages = []
    config = config_from_dict({
        "data_dir": str(data_dir), "save_dir": str(tmp_path / "m"), "model": TINY_TRANSFORMER,
        "train": {"max_steps": 2, "batch_tokens": 200, "valid_every": 2, "valid_max_sentences": 2, "device": "cpu",
                  "precision": "bf16"},
    })
    train(config, progress=False, log=messages.append)
    assert sum("no bf16 matrix instructions" in m for m in messages) == 1
    assert any("bfloat16" in m for m in messages if m.startswith("model:"))


def test_each_process_takes_the_gpu_of_its_local_rank():
    from nmt.distributed import Ranks, rank_device

    assert rank_device(Ranks(rank=3, world=4, local_rank=1), torch.device("cuda")) == torch.device("cuda", 1)
    assert rank_device(Ranks(rank=3, world=4, local_rank=1), torch.device("cpu")) == torch.device("cpu")
    assert rank_device(Ranks(), torch.device("cuda", 0)) == torch.device("cuda", 0)
