"""`cache`: a per-worker-process cache with a time to live, as Segment's functions have."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

_SWEEP_MIN = 1024  # entries before the first sweep of expired ones
# Entries a worker keeps at most: past it the oldest stored go, expired or not (Segment's
# cache is bounded too). Without it a cache of a value per user with no expiry (-1) grew
# until the worker ran out of memory_limit and was killed.
MAX_ENTRIES = 100_000


class Cache:
    """Safe across threads and event loops: a plain `def` handler runs on a thread of its own
    and calls `asyncio.run(cache.load(...))` there, on a loop of its own."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._values: dict[str, tuple[float, Any]] = {}
        self._loading: dict[str, concurrent.futures.Future] = {}
        self._loaders: dict[str, asyncio.Task | None] = {}  # the task loading each key
        self._sweep_at = _SWEEP_MIN

    async def load(
        self,
        key: str,
        ttl_ms: float | None = None,
        fn: Callable[[], Awaitable[Any] | Any] | None = None,
    ) -> Any:
        """The cached value of `key`, or `await fn()` stored for `ttl_ms` (one load at a time).
        As in Segment, a `ttl_ms` of -1, or none (`cache.load(key, fn)`), is no expiry."""
        if fn is None and callable(ttl_ms):
            ttl_ms, fn = None, ttl_ms
        if fn is None:
            raise TypeError("cache.load(key, ttl_ms, fn): give the function that loads the value")
        if ttl_ms is None or (ttl_ms == -1 and not isinstance(ttl_ms, bool)):
            ttl_ms = math.inf
        elif isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int | float):
            raise TypeError(
                f"cache.load: ttl_ms must be a number of milliseconds (-1: no expiry), got"
                f" {type(ttl_ms).__name__}"
            )
        task = asyncio.current_task()
        while True:
            with self._lock:
                found = self._values.get(key)
                if found is not None and found[0] > self._clock():
                    return found[1]
                pending = self._loading.get(key)
                if pending is None:
                    future: concurrent.futures.Future = concurrent.futures.Future()
                    self._loading[key] = future
                    self._loaders[key] = task
                    break
                if self._loaders.get(key) is task:
                    raise RuntimeError(f"cache.load({key!r}) called from its own loader")
            try:
                # (Shielded: this call cancelled must not cancel the load others wait for.)
                return await asyncio.shield(asyncio.wrap_future(pending))
            except asyncio.CancelledError:
                if not pending.cancelled() or (task is not None and task.cancelling()):
                    raise  # this call is the one cancelled
                # The loading call was cancelled (its invocation timed out): load it here.
        try:
            value = fn()
            if inspect.isawaitable(value):
                value = await value
        except BaseException as exc:
            with self._lock:
                del self._loading[key]
                del self._loaders[key]
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()  # the waiters load it themselves
            else:
                future.set_exception(exc)  # waiters re-raise it
            raise
        with self._lock:
            del self._loading[key]
            del self._loaders[key]
            now = self._clock()
            if len(self._values) >= self._sweep_at:  # expired keys go: it cannot grow
                self._values = {k: v for k, v in self._values.items() if v[0] > now}
                if len(self._values) >= MAX_ENTRIES:  # then the oldest stored, a tenth
                    keep = list(self._values.items())[-(MAX_ENTRIES * 9 // 10) :]
                    self._values = dict(keep)
                self._sweep_at = min(MAX_ENTRIES, max(_SWEEP_MIN, 2 * len(self._values)))
            self._values.pop(key, None)  # stored anew: the newest (see MAX_ENTRIES)
            self._values[key] = (now + ttl_ms / 1000, value)
        future.set_result(value)
        return value

    def delete(self, key: str) -> None:
        with self._lock:
            self._values.pop(key, None)


cache = Cache()
