"""`nmt bench-scale`: what preparing, training and translating cost as the input grows.

A synthetic corpus of N pairs is made from a real training set by joining two pairs chosen at
random into one (source to source, target to target): real text, almost no duplicates. Prepare
and a short training run then each run in their own process, so that their peak resident
memory is their own; the same is done on a corpus `ratio` times smaller, and the growth is
reported as ratios. With `translate`, a file of N source sentences drawn at random goes through
`nmt translate MODEL_DIR` instead, and the latency of `--stream` is measured line by line.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nmt.atomic import write_text_atomic
from nmt.corpora import LOCAL_MULTI30K
from nmt.data import find_side_file, read_parallel_files
from nmt.errors import DataError
from nmt.files import Manifest
from nmt.paths import check_output_apart, check_output_file, make_folder
from nmt.shards import worker_count
from nmt.train_log import LOG_NAME

# A small Transformer: the point is the data path, not the model.
TRAIN_SETTINGS = [
    "model.arch=transformer", "model.embed_dim=128", "model.ff_dim=256", "model.heads=4", "model.enc_layers=1",
    "model.dec_layers=1", "train.batch_tokens=2000", "train.log_every=50", "train.valid_every=1000000",
    "train.valid_max_sentences=20", "train.warmup_steps=100", "train.tensorboard=false",
]


STREAM_TIMEOUT = 120  # seconds to wait for one answer of nmt translate --stream


@dataclass
class ScaleBenchConfig:
    data: Path = LOCAL_MULTI30K  # folder with train.SRC.gz and train.TGT.gz
    src: str = "de"
    tgt: str = "en"
    pairs: int = 4_500_000
    ratio: int = 10  # the smaller corpus has pairs / ratio pairs
    steps: int = 200  # training updates
    vocab_size: int = 8000
    seed: int = 1
    work_dir: Path | None = None  # keep corpora, data dirs and models here
    out: Path | None = None  # JSON report
    # Monolingual instead: N sentences of the target language (documents of 20 lines), through
    # nmt prepare --mono and nmt pretrain --data.
    mono: bool = False
    # A model dir: measure nmt translate on N source sentences instead (and --stream's latency).
    translate: Path | None = None
    beam: int | None = None  # with translate: the beam size (default: the model's)
    stream_lines: int = 50  # with translate: lines sent one at a time to nmt translate --stream


def make_synthetic_corpus(pairs: list[tuple[str, str]], count: int, prefix: Path, src: str, tgt: str, seed: int) -> None:
    """Write PREFIX.SRC and PREFIX.TGT: `count` pairs, each two random pairs joined."""
    rng = np.random.default_rng(seed)
    block = 100_000
    with open(f"{prefix}.{src}", "w", encoding="utf-8") as src_file, open(f"{prefix}.{tgt}", "w", encoding="utf-8") as tgt_file:
        for start in range(0, count, block):
            first, second = rng.integers(0, len(pairs), (2, min(block, count - start)))
            src_file.write("".join(f"{pairs[a][0]} {pairs[b][0]}\n" for a, b in zip(first.tolist(), second.tolist())))
            tgt_file.write("".join(f"{pairs[a][1]} {pairs[b][1]}\n" for a, b in zip(first.tolist(), second.tolist())))


def make_synthetic_text(sentences: list[str], count: int, path: Path, seed: int, document_lines: int = 20) -> None:
    """Write `count` sentences, each two random ones joined, a blank line after every `document_lines`."""
    rng = np.random.default_rng(seed)
    block = 100_000
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, count, block):
            first, second = rng.integers(0, len(sentences), (2, min(block, count - start)))
            f.write("".join(
                f"{sentences[a]} {sentences[b]}\n" + ("\n" if (start + i + 1) % document_lines == 0 else "")
                for i, (a, b) in enumerate(zip(first.tolist(), second.tolist()))
            ))


def _run_measured(command: list[str]) -> tuple[float, int, float]:
    """Run a command; returns (wall seconds, peak resident memory in bytes, start time)."""
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
    except BaseException:  # stopped here (SIGTERM to this process alone): the measured command stops too
        process.terminate()
        process.wait()
        raise
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = output.decode("utf-8", "replace").strip().splitlines()[-1:] or ["(no output)"]
        raise DataError(f"{' '.join(command[2:5])} failed: {tail[0]}")
    return time.time() - started, usage.ru_maxrss * 1024, started  # ru_maxrss: KiB on Linux


def _measure(config: ScaleBenchConfig, pairs: list[tuple[str, str]], count: int, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    prefix = work / "corpus"
    made = time.time()
    make_synthetic_corpus(pairs, count, prefix, config.src, config.tgt, config.seed)
    made = time.time() - made
    held_out = max(1, min(1000, count // 20))
    nmt = [sys.executable, "-m", "nmt_cli"]
    prepare_seconds, prepare_rss, _ = _run_measured(nmt + [
        "prepare", "--train", str(prefix), "--src", config.src, "--tgt", config.tgt, "--valid-size", str(held_out),
        "--test-size", str(held_out), "--vocab-size", str(config.vocab_size), "--out", str(work / "data"),
        "--overwrite", "--no-progress",
    ])
    manifest = Manifest.read(work / "data")
    training = _train_measured("train", config.steps, work)
    return {
        "pairs": count,
        "corpus_bytes": sum(os.path.getsize(f"{prefix}.{lang}") for lang in (config.src, config.tgt)),
        "corpus_seconds": round(made, 1),
        "prepare_seconds": round(prepare_seconds, 1),
        "prepare_stage_seconds": manifest.stage_seconds,
        "prepare_pairs_per_s": round(count / prepare_seconds),
        "prepare_peak_rss_bytes": prepare_rss,
        "encode_workers": manifest.encode_workers,
        "train_pairs": manifest.counts["train"]["pairs"],
        "duplicates": manifest.cleaning["duplicates"],
        "data_dir_bytes": manifest.disk_bytes,
        **training,
    }


def _train_measured(command: str, steps: int, work: Path) -> dict:
    """`nmt train` or `nmt pretrain` of the small model on work/data for `steps` updates, in a
    process of its own: start-up (process start to first update), time and peak memory."""
    settings = [item for setting in TRAIN_SETTINGS + [f"train.max_steps={steps}"] for item in ("--set", setting)]
    seconds, rss, started = _run_measured([
        sys.executable, "-m", "nmt_cli", command, "--data", str(work / "data"), "--out", str(work / "model"),
        "--overwrite", "--no-progress", "--device", "cpu", *settings,
    ])
    records = [json.loads(line) for line in (work / "model" / LOG_NAME).read_text().splitlines()]
    start = next(r for r in records if r["type"] == "start")
    return {
        "train_startup_seconds": round(start["time"] - started, 2), "train_setup_seconds": start["setup_seconds"],
        "train_steps": steps, "train_seconds": round(seconds, 1), "train_peak_rss_bytes": rss,
    }


def _measure_mono(config: ScaleBenchConfig, pairs: list[tuple[str, str]], count: int, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    text = work / f"corpus.{config.tgt}"
    made = time.time()
    make_synthetic_text([tgt for _, tgt in pairs], count, text, config.seed)
    made = time.time() - made
    nmt = [sys.executable, "-m", "nmt_cli"]
    prepare_seconds, prepare_rss, _ = _run_measured(nmt + [
        "prepare", "--mono", str(text), "--valid-size", str(max(1, min(1000, count // 20))),
        "--vocab-size", str(config.vocab_size), "--out", str(work / "data"), "--overwrite", "--no-progress",
    ])
    manifest = Manifest.read(work / "data")
    return {
        "sentences": count, "corpus_bytes": text.stat().st_size, "corpus_seconds": round(made, 1),
        "prepare_seconds": round(prepare_seconds, 1), "prepare_stage_seconds": manifest.stage_seconds,
        "prepare_peak_rss_bytes": prepare_rss, "encode_workers": manifest.encode_workers,
        "train_sentences": manifest.counts["train"]["sentences"], "data_dir_bytes": manifest.disk_bytes,
        **_train_measured("pretrain", config.steps, work),
    }


def _measure_translate(config: ScaleBenchConfig, pairs: list[tuple[str, str]], count: int, work: Path) -> dict:
    """`nmt translate` of `count` source sentences drawn at random, in a process of its own."""
    work.mkdir(parents=True, exist_ok=True)
    source, output = work / f"input.{config.src}", work / "output.txt"
    rng = np.random.default_rng(config.seed)
    with open(source, "w", encoding="utf-8") as f:
        for start in range(0, count, 100_000):
            f.write("".join(pairs[i][0] + "\n" for i in rng.integers(0, len(pairs), min(100_000, count - start)).tolist()))
    seconds, rss, _ = _run_measured([
        sys.executable, "-m", "nmt_cli", "translate", str(config.translate), "-i", str(source), "-o", str(output),
        "--device", "cpu", *(["--beam", str(config.beam)] if config.beam is not None else []),
    ])
    with open(output, "rb") as f:
        written = sum(1 for _ in f)
    return {"lines": count, "output_lines": written, "translate_seconds": round(seconds, 1),
            "lines_per_s": round(count / seconds), "translate_peak_rss_bytes": rss}


def stream_latency(config: ScaleBenchConfig, pairs: list[tuple[str, str]]) -> dict:
    """Seconds from writing a line to `nmt translate --stream` to reading its translation, for
    `stream_lines` lines one after the other (after a first line that loads the model)."""
    errors = tempfile.TemporaryFile()  # the child's stderr, for the message if it fails
    process = subprocess.Popen(
        [sys.executable, "-m", "nmt_cli", "translate", str(config.translate), "--stream", "--device", "cpu",
         *(["--beam", str(config.beam)] if config.beam is not None else [])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True, bufsize=1,
    )
    rng = np.random.default_rng(config.seed + 1)
    latencies = []
    try:
        started = time.time()
        for number, index in enumerate(rng.integers(0, len(pairs), config.stream_lines + 1).tolist()):
            sent = time.time()
            process.stdin.write(pairs[index][0] + "\n")
            process.stdin.flush()
            ready, _, _ = select.select([process.stdout], [], [], STREAM_TIMEOUT)
            if not ready or not process.stdout.readline():
                process.kill()
                errors.seek(0)
                tail = (errors.read().decode("utf-8", "replace").strip().splitlines() or ["(no message)"])[-1]
                raise DataError(f"nmt translate --stream gave no answer within {STREAM_TIMEOUT} s: {tail}")
            if number == 0:
                first = time.time() - started
            else:
                latencies.append(time.time() - sent)
        process.stdin.close()
        process.wait(timeout=STREAM_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise DataError(f"nmt translate --stream did not stop within {STREAM_TIMEOUT} s of its input's end") from None
    finally:
        process.kill()
        errors.close()
    return {"lines": len(latencies), "first_answer_seconds": round(first, 2), **latency_figures(latencies)}


def latency_figures(seconds: list[float]) -> dict:
    """Median, 90th percentile (numpy's linear interpolation, as `bench-serve`'s p50/p99) and maximum."""
    median, p90 = np.percentile(seconds, [50, 90]).tolist()
    return {"median_seconds": round(median, 4), "p90_seconds": round(p90, 4), "max_seconds": round(max(seconds), 4)}


def run_scale_bench(config: ScaleBenchConfig) -> dict:
    """Measure the full-size and the smaller corpus; returns the report (also written to `out`)."""
    if config.pairs < 100 or config.ratio < 1 or config.pairs // config.ratio < 100:
        raise DataError("--pairs must be at least 100, and --pairs / --ratio too")
    if config.steps < 1:
        raise DataError(f"--steps must be at least 1 (got {config.steps})")
    if config.beam is not None and config.beam < 1:
        raise DataError(f"--beam must be at least 1 (got {config.beam})")
    if config.out:  # not into the corpus, nor the model it translates
        check_output_apart(Path(config.out), [], [Path(p) for p in (config.data, config.translate) if p])
        check_output_file(Path(config.out))
    if config.work_dir is not None:  # a new folder: what it holds would be written over
        if Path(config.work_dir).is_dir() and any(Path(config.work_dir).iterdir()):
            raise DataError(f"--work-dir {config.work_dir} is not empty; give a new or empty folder for the corpora, "
                            "data dirs and models the bench makes")
        make_folder(Path(config.work_dir), "--work-dir")
    source = Path(config.data) / "train"
    pairs = list(read_parallel_files(find_side_file(source, config.src), find_side_file(source, config.tgt)))
    work = Path(config.work_dir) if config.work_dir else Path(tempfile.mkdtemp(prefix="nmt-bench-scale-"))
    try:
        if config.translate is not None:
            return _translate_report(config, pairs, work, source)
        measure = _measure_mono if config.mono else _measure
        large = measure(config, pairs, config.pairs, work / "large")
        small = measure(config, pairs, config.pairs // config.ratio, work / "small")
    finally:
        if config.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    growth = {
        key: round(large[key] / max(small[key], 1e-9), 2)
        for key in ("prepare_seconds", "prepare_peak_rss_bytes", "data_dir_bytes", "train_startup_seconds",
                    "train_peak_rss_bytes")
    }
    report = {"kind": "monolingual" if config.mono else "parallel", "large": large, "small": small,
              "ratio_large_to_small": growth, "source": str(source),
              "cores": worker_count()}
    return _written(report, config)


def _translate_report(config: ScaleBenchConfig, pairs: list[tuple[str, str]], work: Path, source: Path) -> dict:
    large = _measure_translate(config, pairs, config.pairs, work / "large")
    small = _measure_translate(config, pairs, config.pairs // config.ratio, work / "small")
    report = {
        "kind": "translate", "model": str(config.translate), "beam": config.beam, "large": large, "small": small,
        "ratio_large_to_small": {key: round(large[key] / max(small[key], 1e-9), 2)
                                 for key in ("translate_seconds", "translate_peak_rss_bytes")},
        "stream_latency": stream_latency(config, pairs), "source": str(source), "cores": worker_count(),
    }
    return _written(report, config)


def _written(report: dict, config: ScaleBenchConfig) -> dict:
    if config.out:
        write_text_atomic(Path(config.out), json.dumps(report, indent=2) + "\n")
    return report
