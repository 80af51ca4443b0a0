"""Data-parallel training with torchrun: 2 CPU processes (gloo) against one process."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import TINY_TRANSFORMER, prepare_toy_data, set_options
from safetensors.torch import load_file

from nmt.config import config_from_dict
from nmt.train import train

pytestmark = pytest.mark.slow  # several processes, or training that takes seconds

MODEL = set_options("model", {k: v for k, v in TINY_TRANSFORMER.items() if k != "arch"})
TRAIN = ["--set", "train.batch_tokens=80", "--set", "train.accum_steps=2", "--set", "train.lr=0.003",
         "--set", "train.warmup_steps=5", "--set", "train.max_steps=4", "--set", "train.log_every=2",
         "--set", "train.valid_every=3", "--set", "train.valid_max_sentences=3"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return prepare_toy_data(tmp_path_factory.mktemp("ddp"), train=80)


def _losses(save_dir):
    records = [json.loads(line) for line in (save_dir / "train_log.jsonl").read_text().splitlines()]
    return [r for r in records if r["type"] == "train"], [r for r in records if r["type"] == "valid"]


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_two_processes_train_as_one_with_the_same_global_batch(data_dir, tmp_path):
    two = tmp_path / "two"
    result = subprocess.run(
        [sys.executable, "-m", "nmt_cli", "train", "--data", str(data_dir), "--out", str(two), "--device", "cpu",
         "--devices", "2", "--no-progress", *MODEL, *TRAIN],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("trained 4 steps") == 1  # the main process reports, once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]
    train_records, valid_records = _losses(two)
    assert [r["step"] for r in train_records] == [2, 4]  # logged once, not once per process
    assert [r["step"] for r in valid_records] == [3, 4]

    # One process, accumulating the two batches the processes shared (within the first epoch: at
    # its end, several processes leave out a last update too small to share).
    overrides = {a.split("=")[0]: a.split("=")[1] for a in (MODEL + TRAIN)[1::2]}
    config = {"data_dir": str(data_dir), "save_dir": str(tmp_path / "one"), "model": {}, "train": {"device": "cpu"}}
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = float(value) if "." in value else int(value)
    train(config_from_dict(config), progress=False)
    one_records, _ = _losses(tmp_path / "one")
    assert [r["loss"] for r in train_records] == pytest.approx([r["loss"] for r in one_records], abs=1e-3)
    weights_two = load_file(str(two / "last" / "model.safetensors"))
    weights_one = load_file(str(tmp_path / "one" / "last" / "model.safetensors"))
    for name, tensor in weights_one.items():
        if name.endswith("k_proj.bias"):
            # Attention ignores a bias added to every key, so its gradient is zero plus rounding
            # noise, which Adam scales up to whole steps of either sign.
            continue
        torch.testing.assert_close(weights_two[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    rng = load_file(str(two / "last" / "optimizer.safetensors"))
    assert {"rng.cpu.rank0", "rng.cpu.rank1"} <= set(rng)


def _train_two_processes(data_dir, out, *extra):
    result = subprocess.run(
        [sys.executable, "-m", "nmt_cli", "train", "--data", str(data_dir), "--out", str(out), "--device", "cpu",
         "--devices", "2", "--no-progress", *MODEL, *TRAIN, *extra],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_two_processes_share_an_update_of_three_batches(data_dir, tmp_path):
    # 3 batches of 80 tokens cannot be shared by 2 processes: each takes one batch of 120.
    result = _train_two_processes(data_dir, tmp_path / "m", "--set", "train.accum_steps=3")
    assert "2 processes, 1 batch(es) of 120 tokens each per update" in result.stderr
    train_records, _ = _losses(tmp_path / "m")
    assert [r["step"] for r in train_records] == [2, 4] and all(0 < r["loss"] < 20 for r in train_records)


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_two_processes_resume_as_if_never_stopped(data_dir, tmp_path):
    longer = ["--set", "train.max_steps=8", "--set", "model.dropout=0.2"]  # dropout: random state matters
    _train_two_processes(data_dir, tmp_path / "whole", *longer)
    _train_two_processes(data_dir, tmp_path / "halves", "--set", "model.dropout=0.2")  # max_steps 4
    _train_two_processes(data_dir, tmp_path / "halves", *longer, "--resume")
    whole, _ = _losses(tmp_path / "whole")
    halves, _ = _losses(tmp_path / "halves")
    assert [r["step"] for r in halves] == [2, 4, 6, 8]
    assert [r["loss"] for r in halves] == [r["loss"] for r in whole]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is asked for where there is none")
def test_a_missing_gpu_is_one_error_before_any_process_starts(data_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "nmt_cli", "train", "--data", str(data_dir), "--out", str(tmp_path / "m"),
         "--device", "cuda", "--devices", "2", "--no-progress", *MODEL, *TRAIN],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1 and "CUDA is not available" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("command", [
    ["train", "--data", "{tmp}/no-data"],
    ["pretrain", "--text", "{tmp}/missing.en"],
    ["pretrain", "--data", "{tmp}/no-data", "--vocab-size", "50"],
])
def test_user_errors_are_one_line_before_any_process_starts(tmp_path, command):
    """Refused by the launching command, not by each of the processes among torchrun's lines."""
    args = [part.format(tmp=tmp_path) for part in command]
    result = subprocess.run(
        [sys.executable, "-m", "nmt_cli", *args, "--out", str(tmp_path / "m"), "--device", "cpu", "--devices", "2",
         "--no-progress", *MODEL, *TRAIN],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1 and result.stderr.startswith("error: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def _start_long_run(data_dir, out, tmp):
    """Two processes training for as long as they are let; returns once they have logged."""
    import os
    import time

    tmp.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "nmt_cli", "train", "--data", str(data_dir), "--out", str(out), "--device", "cpu",
         "--devices", "2", "--no-progress", *MODEL, *TRAIN, "--set", "train.max_steps=100000", "--set", "train.valid_every=100000",
         "--set", "train.max_minutes=2"],  # should the workers outlive the test, not for long
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "TMPDIR": str(tmp)},
    )
    deadline = time.monotonic() + 300
    while not (out / "train_log.jsonl").is_file() or '"type": "train"' not in (out / "train_log.jsonl").read_text():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
        time.sleep(0.2)
    return process


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_the_workers_stop_and_save_when_the_launcher_is_stopped_or_killed(data_dir, tmp_path, signal_name):
    """SIGTERM to torchrun's process: the workers save last/ and it exits with 0. Killed (the
    OOM killer, kill -9): the workers stop all the same, not training on unwatched. Either way
    torchrun's log folder is not left in the temporary directory."""
    import os
    import signal

    process = _start_long_run(data_dir, tmp_path / "m", tmp_path / "tmp")
    os.kill(process.pid, getattr(signal, signal_name))
    output = process.communicate(timeout=100)[0]  # the pipe ends when the workers have too
    assert "stopped by SIGTERM at step" in output, output
    assert (tmp_path / "m" / "last" / "model.safetensors").is_file()
    if signal_name == "SIGTERM":  # stopped and saved: exit status 0, as with one process
        assert process.returncode == 0 and "error" not in output, output
        assert [p.name for p in (tmp_path / "tmp").iterdir() if "torch" in p.name and "inductor" not in p.name] == []


def _agree_and_sum(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from nmt.distributed import Ranks

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        ranks, cpu = Ranks(rank, 2, rank), torch.device("cpu")
        result = {"agree": ranks.agree(2 if rank == 0 else 0, cpu), "sum": ranks.sum([rank + 1.0, 10.0], cpu)}
        (__import__("pathlib").Path(out_dir) / f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")
def test_processes_agree_on_the_largest_code_and_sum_elementwise(tmp_path):
    """Processes agree on the largest code: a stop only the main process decides on (patience,
    target_bleu: it alone validates) is taken by all."""
    import torch.multiprocessing as mp

    mp.spawn(_agree_and_sum, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert results == [{"agree": 2, "sum": [3.0, 20.0]}] * 2


@pytest.mark.parametrize("launcher_alive", [True, False])
def test_a_worker_whose_launcher_died_before_it_began_watching_stops(launcher_alive):
    """A worker is told its launcher's process id: if that process is gone already when the
    watch starts (the worker is then another process's child), it stops all the same."""
    import os

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    launcher = str(os.getpid()) if launcher_alive else gone.stdout.strip()
    script = ("import time\nfrom nmt.distributed import stop_with_launcher\n"
              "stop_with_launcher()\ntime.sleep(4)\nprint('trained on')\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "NMT_LAUNCHER_PID": launcher})
    if launcher_alive:
        assert run.returncode == 0 and "trained on" in run.stdout, run.stderr
    else:
        assert run.returncode == -15 and "trained on" not in run.stdout, run.stderr  # SIGTERM, as when it dies later


def test_one_process_keeps_the_gpu_it_was_given_and_zero_devices_go_to_the_launcher_to_be_refused(monkeypatch):
    from nmt.distributed import Launch, Ranks, rank_device

    assert rank_device(Ranks(), torch.device("cuda", 1)) == torch.device("cuda", 1)  # --device cuda:1, one process
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert Launch(0, ["train"]).starts_processes and not Launch(1, ["train"]).starts_processes
