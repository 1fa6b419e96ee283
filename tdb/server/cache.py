"""The results cache: serialised responses keyed by everything that determines them.

Results are stored as the JSON bytes sent to the client, so the memory a cache holds is the sum
of its values' lengths, bounded by both an entry count and a byte count (least recently used
entries go first). A request that asks for a result already being computed waits for that
computation instead of starting a second one.

>>> cache = ResultCache(max_entries=256, max_bytes=64 << 20)
>>> body, hit = await cache.get_or_compute(key, compute)   # compute: async () -> bytes
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any


def cache_key(route: str, canonical_request: str) -> str:
    """The key of a route's result: a hash of the route and the request's canonical JSON."""
    return hashlib.sha256(f"{route}\n{canonical_request}".encode()).hexdigest()


class ResultCache:
    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        # Computations in progress, by key; only touched from the event loop.
        self._running: dict[str, asyncio.Future[bytes]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: str, value: bytes) -> None:
        if len(value) > self.max_bytes or self.max_entries <= 0:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            self._nbytes -= 0 if old is None else len(old)
            self._entries[key] = value
            self._nbytes += len(value)
            while len(self._entries) > self.max_entries or self._nbytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._nbytes -= len(dropped)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._nbytes = 0

    async def get_or_compute(
        self, key: str, compute: Callable[[], Coroutine[Any, Any, bytes]]
    ) -> tuple[bytes, bool]:
        """The cached value (and True), or the value computed now or by a request already
        computing it (and False). Errors are not cached: each waiting caller sees the exception.

        The computation runs as its own task, so a caller that goes away (its task cancelled)
        neither cancels it for the others nor loses its result for the cache."""
        value = self.get(key)
        if value is not None:
            return value, True
        task = self._running.get(key)
        if task is None:
            task = asyncio.ensure_future(compute())
            self._running[key] = task
            task.add_done_callback(functools.partial(self._finished, key))
        return await asyncio.shield(task), False

    def _finished(self, key: str, task: asyncio.Future[bytes]) -> None:
        # Runs before any waiter resumes, so the value is in the cache by the time they do.
        del self._running[key]
        if not task.cancelled() and task.exception() is None:
            self.put(key, task.result())
