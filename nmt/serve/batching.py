"""Requests from many clients, translated together: one worker thread gathers what arrives within
a few milliseconds into one batched search, so the model is never called from two threads at
once and a busy server decodes many sentences per step instead of one."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from nmt.config import DecodeConfig
from nmt.models.attention import AttentionChoice
from nmt.translate import TextTranslator, Translations


@dataclass(frozen=True, eq=False)
class Work:
    """How a request is to be translated; requests that agree on it share one search."""

    translator: TextTranslator
    nbest: int
    attention: bool

    def shares_search_with(self, other: Work) -> bool:
        return self.translator is other.translator and (self.nbest, self.attention) == (other.nbest, other.attention)

    def decode(self) -> DecodeConfig:
        settings = self.translator.decode
        return dataclasses.replace(settings, nbest=self.nbest, beam=max(settings.beam, self.nbest))


@dataclass
class Job:
    work: Work
    lines: list[str]
    future: Future = field(default_factory=Future)  # -> Translations of `lines`


class BatchingWorker:
    """A queue of translation jobs served by one thread, in the order they came.

    The worker takes the oldest job, waits up to `wait_ms` for more, and translates every
    waiting job of the same `Work` (up to `max_lines` lines) in one call. A job whose future was
    cancelled (its request timed out) before the worker reached it is skipped.
    """

    def __init__(self, wait_ms: float = 5.0, max_lines: int = 256):
        self.wait_s = wait_ms / 1000
        self.max_lines = max_lines
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting: list[Job] = []  # taken from the queue, not yet translated (worker thread only)
        self._thread = threading.Thread(target=self._run, name="nmt-translate", daemon=True)
        self._thread.start()

    def submit(self, work: Work, lines: Sequence[str]) -> Future:
        job = Job(work, list(lines))
        self._queue.put(job)
        return job.future

    @property
    def pending(self) -> int:
        return self._queue.qsize() + len(self._waiting)

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        stopping = False  # after close(): translate what is waiting, then end
        while not (stopping and not self._waiting):
            if not self._waiting and not stopping:
                job = self._queue.get()
                if job is None:
                    return
                self._waiting.append(job)
                deadline = time.monotonic() + self.wait_s
            else:
                deadline = time.monotonic()  # take what came while the last batch ran
            if not stopping:
                stopping = self._gather(deadline)
            self._translate(self._take_batch())

    def _gather(self, deadline: float) -> bool:
        """Move jobs from the queue to `_waiting` until `deadline`; True when close() was called."""
        while True:
            timeout = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                return False
            if job is None:
                return True
            self._waiting.append(job)

    def _take_batch(self) -> list[Job]:
        """The oldest job and the later ones of its kind, within `max_lines` lines in all."""
        first = self._waiting[0]
        batch, rest, lines = [], [], 0
        for job in self._waiting:
            fits = job.work.shares_search_with(first.work) and (not batch or lines + len(job.lines) <= self.max_lines)
            if fits:
                batch.append(job)
                lines += len(job.lines)
            else:
                rest.append(job)
        self._waiting = rest
        return [job for job in batch if job.future.set_running_or_notify_cancel()]

    def _translate(self, batch: list[Job]) -> None:
        if not batch:
            return
        work = batch[0].work
        lines = [line for job in batch for line in job.lines]
        try:
            result = work.translator.translate(lines, attention=AttentionChoice() if work.attention else None,
                                               decode=work.decode())
        except Exception as e:  # noqa: BLE001 - handed to the requests; the worker goes on
            if len(batch) == 1:
                batch[0].future.set_exception(e)
            else:  # one request's lines may be the cause: each alone, so that only its own fails
                for job in batch:
                    self._translate([job])
            return
        start = 0
        for job in batch:
            job.future.set_result(_slice(result, start, start + len(job.lines)))
            start += len(job.lines)


def _slice(result: Translations, start: int, end: int) -> Translations:
    """The translations of lines start..end-1 of a batch, numbered from 1 again."""
    maps = None
    if result.attention_maps is not None:
        maps = [m and dataclasses.replace(m, line=m.line - start) for m in result.attention_maps[start:end]]

    def numbers(lines: list[int]) -> list[int]:  # 1-based numbers of the batch's lines
        return [n - start for n in lines if start < n <= end]

    return Translations(result.hypotheses[start:end], result.texts[start:end], numbers(result.truncated), maps,
                        numbers(result.unknown_in_prefix))
