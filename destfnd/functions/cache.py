"""`cache`: a per-worker-process cache with a time to live, as Segment's functions have."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

_SWEEP_MIN = 1024  # entries before the first sweep of expired ones


class Cache:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._values: dict[str, tuple[float, Any]] = {}
        self._loading: dict[str, asyncio.Future] = {}
        self._loaders: dict[str, asyncio.Task | None] = {}  # the task loading each key
        self._sweep_at = _SWEEP_MIN

    async def load(self, key: str, ttl_ms: float, fn: Callable[[], Awaitable[Any] | Any]) -> Any:
        """The cached value of `key`, or `await fn()` stored for `ttl_ms` (one load at a time)."""
        if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int | float):
            raise TypeError(f"cache.load: ttl_ms must be a number, got {type(ttl_ms).__name__}")
        while True:
            found = self._values.get(key)
            if found is not None and found[0] > self._clock():
                return found[1]
            pending = self._loading.get(key)
            if pending is None:
                break
            if self._loaders.get(key) is asyncio.current_task():
                raise RuntimeError(f"cache.load({key!r}) called from its own loader")
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not pending.cancelled() or (task is not None and task.cancelling()):
                    raise  # this call is the one cancelled
                # The loading call was cancelled (its invocation timed out): load it here.
        future = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        self._loaders[key] = asyncio.current_task()
        try:
            value = fn()
            if inspect.isawaitable(value):
                value = await value
        except asyncio.CancelledError:
            future.cancel()  # the waiters load it themselves
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs it as lost
            raise
        finally:
            del self._loading[key]
            del self._loaders[key]
        now = self._clock()
        if len(self._values) >= self._sweep_at:  # expired keys go, so the cache cannot grow
            self._values = {k: v for k, v in self._values.items() if v[0] > now}
            self._sweep_at = max(_SWEEP_MIN, 2 * len(self._values))
        self._values[key] = (now + ttl_ms / 1000, value)
        future.set_result(value)
        return value

    def delete(self, key: str) -> None:
        self._values.pop(key, None)


cache = Cache()
