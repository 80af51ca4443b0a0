"""`nmt bench-serve`: sentences per second and latency of `nmt serve` under 1, 8 and 32 clients
on loopback, each sending one line per request, with requests batched (the default) and served
one at a time; every answer is checked against `nmt translate`'s output for its line."""

from __future__ import annotations

import http.client
import itertools
import json
import math
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from nmt.atomic import write_text_atomic
from nmt.data import read_lines
from nmt.errors import DataError
from nmt.paths import check_output_apart, check_output_file
from nmt.translate import load_text_translator

# How each server is started: batching is the default; one at a time takes one request per batch.
MODES = {"one_at_a_time": ["--batch-wait-ms", "0", "--max-batch-lines", "1"], "batched": []}


@dataclass
class LoadResult:
    clients: int
    sentences: int
    seconds: float
    sentences_per_second: float
    p50_ms: float
    p99_ms: float
    wrong: int  # answers that differ from nmt translate's for the line
    failed: int  # requests that did not answer 200 (left out of sentences_per_second)


WARM_UP_LINES = 16


def bench_serve(
    model_dir: Path, source: Path, clients: Sequence[int] = (1, 8, 32), lines: int | None = None, beam: int | None = None,
    device: str = "auto", engine: str = "nmt", echo: Callable[[str], None] = print, out: Path | None = None,
) -> dict:
    """Each client count against a server that batches and one that does not (each a process
    of its own); returns the results and the ratio of batched to one-at-a-time throughput (also
    written to `out`, which is checked first)."""
    if lines is not None and lines < 1:
        raise DataError(f"--lines must be at least 1 (got {lines})")
    if out is not None:
        check_output_apart(Path(out), [Path(source)], [Path(model_dir)])
        check_output_file(Path(out))
    sources = list(read_lines(Path(source)))[:lines]
    if not sources:
        raise DataError(f"{source} has no lines")
    translator = load_text_translator([Path(model_dir)], {"beam": beam}, device=device, engine=engine)
    expected = [texts[0] for texts in translator.translate(sources).texts]  # what nmt translate writes
    pair = {"source": translator.languages[0], "target": translator.languages[1]}
    results: dict[str, list[LoadResult]] = {}
    for mode, options in MODES.items():
        with _server(model_dir, beam, device, engine, options) as url:
            # Untimed first requests: what a server does once (allocations, a GPU's first kernels)
            # is no part of its steady throughput.
            run_clients(url, sources[:WARM_UP_LINES], expected[:WARM_UP_LINES], pair, 1)
            results[mode] = []
            for count in clients:
                result = run_clients(url, sources, expected, pair, count)
                echo(f"{mode:>14}: {count:>3} clients  {result.sentences_per_second:8.1f} sentences/s  "
                     f"p50 {result.p50_ms:7.1f} ms  p99 {result.p99_ms:7.1f} ms  wrong {result.wrong}  failed {result.failed}")
                results[mode].append(result)
    # None where one of the two answered nothing (every request refused: see `failed`)
    ratios = {str(b.clients): round(b.sentences_per_second / a.sentences_per_second, 2) if a.sentences_per_second else None
              for a, b in zip(results["one_at_a_time"], results["batched"])}
    echo("batched / one at a time: " + ", ".join(f"{n} clients " + (f"{r}x" if r is not None else "n/a (no answers)")
                                                 for n, r in ratios.items()))
    report = {"model": str(model_dir), "source": str(source), "sentences": len(sources), "engine": engine,
              "beam": translator.decode.beam, **{mode: [asdict(r) for r in rs] for mode, rs in results.items()},
              "speedup": ratios}
    if out is not None:
        write_text_atomic(Path(out), json.dumps(report, indent=2) + "\n")
    return report


def run_clients(url: str, sources: list[str], expected: list[str], pair: dict, clients: int) -> LoadResult:
    """`clients` threads, each with one keep-alive connection, sending the lines one per request
    until every line is sent once."""
    host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()
    next_line = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    wrong = failed = 0

    def client() -> None:
        nonlocal wrong, failed
        connection = http.client.HTTPConnection(host, int(port), timeout=120)
        while (i := next(next_line)) < len(sources):
            body = json.dumps({"q": sources[i], **pair})
            start = time.perf_counter()
            try:
                connection.request("POST", "/translate", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                answer = response.read()
            except (OSError, http.client.HTTPException):  # a timeout or a dropped connection: failed, and a new one
                connection.close()
                connection = http.client.HTTPConnection(host, int(port), timeout=120)
                with lock:
                    failed += 1
                continue
            took = time.perf_counter() - start
            with lock:
                latencies.append(took)
                if response.status != 200:
                    failed += 1
                elif json.loads(answer)["translatedText"] != expected[i]:
                    wrong += 1
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    ms = np.asarray(latencies or [math.nan]) * 1000  # NaN: no request was answered
    answered = len(sources) - failed  # a failed request is no throughput
    return LoadResult(clients, len(sources), round(seconds, 2), round(answered / seconds, 1),
                      round(float(np.percentile(ms, 50)), 1), round(float(np.percentile(ms, 99)), 1), wrong, failed)


class _server:
    """`nmt serve` in a process of its own (so that the clients do not share its interpreter)."""

    def __init__(self, model_dir: Path, beam: int | None, device: str, engine: str, options: list[str]):
        self.command = [sys.executable, "-m", "nmt_cli", "serve", str(model_dir), "--port", "0", "--device", device,
                        "--engine", engine, "--max-lines", "100000", *options, *([] if beam is None else ["--beam", str(beam)])]

    def __enter__(self) -> str:
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for line in self.process.stdout:
                if found := re.search(r"http://[^/\s]+", line):
                    return found.group(0)
        except BaseException:  # stopped while the server starts: it stops too
            self.__exit__()
            raise
        self.process.wait()
        raise DataError(f"nmt serve did not start: {self.process.stderr.read().strip()}")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(30)
