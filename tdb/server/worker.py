"""The model worker: model work runs on one thread, one job at a time, off the event loop.

The event loop stays free to answer cheap requests (model info, tokenize, cached results) while
a table is computed. At most `queue_size` jobs wait behind the running one; past that `run`
raises `QueueFullError` at once, and the app answers 503 with a Retry-After estimate, instead of
letting work pile up without bound.

>>> worker = ModelWorker(queue_size=8)
>>> table = await worker.run(lambda: node_table_response(...))
>>> worker.close()
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class QueueFullError(Exception):
    """The worker has `queue_size` jobs waiting already; try again after `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is busy; retry after {retry_after} s")
        self.retry_after = retry_after


class ModelWorker:
    def __init__(self, queue_size: int) -> None:
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        self.queue_size = queue_size
        self._executor: ThreadPoolExecutor | None = None  # started by the first job
        self._lock = threading.Lock()
        self._pending = 0  # the running job plus the waiting ones
        # For Retry-After: a running mean of job times (None until a job has ended), and when
        # the running job started (None when none runs).
        self._mean_seconds: float | None = None
        self._started: float | None = None

    @property
    def pending(self) -> int:
        return self._pending

    def retry_after(self) -> int:
        """Seconds until the jobs pending now have likely run (at least 1): their number times
        the mean job time, or the running job's time so far when that is longer (the first
        jobs have no mean yet, and a slow job says more about the next ones than an old mean).
        """
        started = self._started
        running = 0.0 if started is None else time.perf_counter() - started
        per_job = max(self._mean_seconds or 0.0, running)
        return max(1, math.ceil(self._pending * per_job))

    async def run(self, job: Callable[[], T]) -> T:
        """Run `job` on the worker thread and wait for it; QueueFullError if too many wait."""
        with self._lock:
            if self._pending > self.queue_size:
                raise QueueFullError(self.retry_after())
            self._pending += 1
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tdb-model")
            executor = self._executor
        try:
            future = executor.submit(self._timed, job)
        except BaseException:
            self._release(None)
            raise
        # Released when the job ends (or is cancelled before it starts), not when this caller
        # stops waiting: a job whose client went away still occupies the thread until it ends.
        future.add_done_callback(self._release)
        return await asyncio.wrap_future(future)

    def _timed(self, job: Callable[[], T]) -> T:
        start = self._started = time.perf_counter()
        try:
            return job()
        finally:
            elapsed = time.perf_counter() - start
            mean = self._mean_seconds
            self._mean_seconds = elapsed if mean is None else 0.8 * mean + 0.2 * elapsed
            self._started = None

    def _release(self, _: object) -> None:
        with self._lock:
            self._pending -= 1

    def close(self) -> None:
        """Cancel waiting jobs, wait for the running one, and end the thread (the next job, if
        any, starts a new one: an app may be started and stopped several times, as in tests)."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
