"""Data-parallel training over several processes (one per GPU, or CPU processes with gloo).

Processes are started by `torchrun` (or `nmt train --devices N`, which calls it); each reads its
rank from the environment torchrun sets. With one process every method here is a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nmt.devices import resolve_device
from nmt.errors import ConfigError


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints and logs, and validates."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over all processes (waits for them)."""
        if not self.active:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def agree(self, code: int, device: torch.device) -> int:
        """The largest of every process's `code`: one decision (such as stopping) for all."""
        if not self.active:
            return code
        tensor = torch.tensor([code], dtype=torch.long, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every process's CPU `tensor`, in rank order (for saving per-rank random state)."""
        if not self.active:
            return [tensor]
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, tensor)
        return gathered

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def init_ranks(device_name: str) -> Ranks:
    """Join the process group torchrun set up, if any. GPUs use NCCL, one GPU per local rank;
    CPU processes use gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    stop_with_launcher()
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device_name!r} was asked for, but CUDA is not available on this machine")
    if use_cuda:
        torch.cuda.set_device(ranks.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return ranks


LAUNCHER_WATCH = "nmt-launcher-watch"
LAUNCHER_PID = "NMT_LAUNCHER_PID"  # set for the processes `start_processes` starts


def stop_with_launcher() -> None:
    """This process (a worker torchrun started) gets one SIGTERM when torchrun's process ends,
    killed though it may be: it then saves last/ and stops, as on Ctrl-C, instead of training on
    unwatched and holding the checkpoint directory's lock. (Linux's parent-death signal would
    come once for each of the dying parent's threads, and a second SIGTERM stops at once.)"""
    if any(thread.name == LAUNCHER_WATCH for thread in threading.enumerate()):  # one per process
        return
    # The launcher as `start_processes` named it: one that died before this watch began is
    # noticed too (the process is then another's child).
    launcher = int(os.environ.get(LAUNCHER_PID, os.getppid()))

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name=LAUNCHER_WATCH, daemon=True).start()


def rank_device(ranks: Ranks, device: torch.device) -> torch.device:
    """Each process on its own GPU."""
    if ranks.active and device.type == "cuda":
        return torch.device("cuda", ranks.local_rank)
    return device


SHUTDOWN_SECONDS = 600


@dataclass
class Launch:
    """Asked for: a run in `devices` processes on this machine, each started by torchrun with
    `command_line` (the user's own `train ...` or `pretrain ...`, without the program name)."""

    devices: int
    command_line: list[str]

    @property
    def starts_processes(self) -> bool:
        """Whether this process starts the others instead of training: several are asked for,
        and this is not already one of them (torchrun sets WORLD_SIZE in those)."""
        return self.devices != 1 and "WORLD_SIZE" not in os.environ


@contextlib.contextmanager
def launcher_pid_set():
    """LAUNCHER_PID names this process (torchrun runs in it: the workers' parent) while it
    starts workers, and what it named before afterwards."""
    before = os.environ.get(LAUNCHER_PID)
    os.environ[LAUNCHER_PID] = str(os.getpid())
    try:
        yield
    finally:
        if before is None:
            del os.environ[LAUNCHER_PID]
        else:
            os.environ[LAUNCHER_PID] = before


def start_processes(devices: int, command_line: list[str], device: str = "auto") -> int:
    """Run `nmt COMMAND_LINE` (a train or pretrain command, as the user typed it) in `devices`
    processes on this machine, through torchrun; `device` (train.device) is checked before."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    if devices < 1:
        raise ConfigError("--devices must be at least 1")
    on_gpus = resolve_device(device).type == "cuda"  # a missing GPU is one error here, not one per process
    if on_gpus and devices > torch.cuda.device_count():
        raise ConfigError(f"--devices {devices} asked for, but this machine has {torch.cuda.device_count()} GPUs")
    # After Ctrl-C or SIGTERM torchrun waits this long (30 s by default) before it kills the
    # processes: they stop at the next log step, which may be further off, and save last/ first.
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_SECONDS))
    # torchrun's log folder, which it would leave in the temporary directory after every run
    with tempfile.TemporaryDirectory(prefix="nmt-torchrun-") as logs, launcher_pid_set():
        try:
            torchrun(["--standalone", f"--nproc_per_node={devices}", f"--log-dir={logs}", "-m", "nmt_cli", *command_line])
        except SystemExit as e:
            return int(e.code or 0)
        except SignalException:  # Ctrl-C or SIGTERM: the processes stopped and saved, and said so, as one does
            return 0
        except Exception as e:  # torchrun reports a failed worker as ChildFailedError, after its output
            print(f"error: training failed in a worker process ({type(e).__name__})", file=sys.stderr)
            return 1
    return 0
