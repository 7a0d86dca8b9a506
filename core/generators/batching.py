"""Static dynamic batching for a local generator shared by concurrent callers: the engine
``metareason serve`` used before continuous batching (:mod:`metareason.serving`), kept as the
baseline ``metareason bench serve`` measures against.

Callers ``submit`` a request and get a ``concurrent.futures.Future``. One worker thread takes the
first waiting request, waits up to ``window_s`` (or until ``max_batch`` rows) for more, and runs
requests with the same sampling parameters as one batched ``generate`` call. The queue is
bounded: ``submit`` raises :class:`QueueFull` at once instead of letting callers pile up.
Requests with a ``seed`` run alone, so their samples do not depend on what they were batched with.
"""
from __future__ import annotations

import itertools
import queue
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Optional

from metareason.generators.base import Completion, Prompt


class QueueFull(RuntimeError):
    """The request queue is full (the server answers 429)."""


class EngineStopped(RuntimeError):
    """The engine is shutting down (the server answers 503)."""


@dataclass
class Request:
    prompts: list[Prompt]
    n: int = 1
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: Optional[int] = None
    future: Future = field(default_factory=Future)
    uid: int = 0

    def key(self) -> tuple:
        alone = self.uid if self.seed is not None else None
        return (self.n, self.max_new_tokens, self.temperature, self.top_p, self.stop, alone)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n


class BatchingEngine:
    def __init__(self, generator, max_batch: int = 32, window_s: float = 0.01, max_queue: int = 256):
        self.generator, self.max_batch, self.window_s = generator, max_batch, window_s
        self._queue: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self._stopping = threading.Event()
        self._ids = itertools.count(1)
        self.batches = 0  # batched generate calls so far
        self.batched_requests = 0  # requests served by them
        self._thread = threading.Thread(target=self._loop, name="batching-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> Future:
        if self._stopping.is_set():
            raise EngineStopped("the server is shutting down")
        request.uid = next(self._ids)
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"request queue full ({self._queue.maxsize} waiting)") from None
        return request.future

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in progress; fail every request still waiting (idempotent)."""
        self._stopping.set()
        self._thread.join(timeout)
        self._fail_waiting()

    def _fail_waiting(self) -> None:
        while True:
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                return
            if not req.future.done():
                req.future.set_exception(EngineStopped("the server is shutting down"))

    def _collect(self) -> list[Request]:
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        batch, rows = [first], first.rows
        deadline = time.monotonic() + self.window_s
        while rows < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                req = self._queue.get(timeout=left)
            except queue.Empty:
                break
            batch.append(req)
            rows += req.rows
        return batch

    def _loop(self) -> None:
        while not self._stopping.is_set():
            batch = self._collect()
            groups: dict[tuple, list[Request]] = {}
            for req in batch:
                groups.setdefault(req.key(), []).append(req)
            for reqs in groups.values():
                self._run(reqs)

    def _run(self, reqs: list[Request]) -> None:
        live = [r for r in reqs if r.future.set_running_or_notify_cancel()]
        if not live:
            return
        first = live[0]
        prompts = [p for r in live for p in r.prompts]
        try:
            out = self.generator.generate(prompts, n=first.n, max_new_tokens=first.max_new_tokens,
                                          temperature=first.temperature, top_p=first.top_p,
                                          stop=list(first.stop), seed=first.seed)
        except Exception as exc:  # the requests get the error; the engine keeps serving
            print(f"[serve] generation failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            for r in live:
                r.future.set_exception(exc)
            return
        self.batches += 1
        self.batched_requests += len(live)
        start = 0
        for r in live:
            mine: list[Completion] = out[start: start + r.rows]
            for c in mine:
                c.prompt_index -= start // r.n
            start += r.rows
            r.future.set_result(mine)
