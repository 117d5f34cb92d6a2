from __future__ import annotations

import asyncio
import sys

import pytest

from destfnd.functions.cache import Cache


async def test_cache_loads_once_until_expiry_and_sweeps_expired_keys():
    now = [0.0]
    cache = Cache(clock=lambda: now[0])
    loads = []

    async def load(key):
        loads.append(key)
        return f"value-{key}-{len(loads)}"

    assert await cache.load("token", 1_000, lambda: load("token")) == "value-token-1"
    assert await cache.load("token", 1_000, lambda: load("token")) == "value-token-1"
    now[0] = 2.0  # past the ttl: loaded again
    assert await cache.load("token", 1_000, lambda: load("token")) == "value-token-2"
    cache.delete("token")
    assert await cache.load("token", 1_000, lambda: load("token")) == "value-token-3"
    # Thousands of short-lived keys: the expired ones are swept, the live one stays.
    for i in range(5_000):
        now[0] += 0.01
        await cache.load(f"k{i}", 5, lambda i=i: i)
    assert len(cache._values) < 2_100
    assert await cache.load("token", 10**9, lambda: load("token")) == "value-token-4"


async def test_cache_load_refuses_a_ttl_that_is_no_number_before_loading():
    """It failed after loading, leaving another call waiting on the key until its timeout."""
    cache = Cache()
    calls = []
    expected = r"ttl_ms must be a number of milliseconds \(-1: no expiry\), got str"
    with pytest.raises(TypeError, match=expected):
        await cache.load("k", "1000", lambda: calls.append(1))
    assert calls == []
    assert await cache.load("k", 1000, lambda: "v") == "v"


async def test_cache_ttl_of_minus_one_or_none_is_no_expiry_as_in_segment():
    """Segment: "If omitted or set to -1, the value will have no expiry". -1 was stored
    expired, so a ported token cache fetched a token for every event."""
    now = [0.0]
    cache = Cache(clock=lambda: now[0])
    loads = []

    def token():
        loads.append(1)
        return f"tok{len(loads)}"

    assert await cache.load("a", -1, token) == "tok1"
    assert await cache.load("b", token) == "tok2"  # cache.load(key, fn): no ttl given
    assert await cache.load("c", None, token) == "tok3"
    now[0] = 10.0**9
    assert [await cache.load(k, -1, token) for k in "abc"] == ["tok1", "tok2", "tok3"]
    assert await cache.load("d", -5, token) == "tok4"  # another negative: expired at once
    assert await cache.load("d", -5, token) == "tok5"
    with pytest.raises(TypeError, match="give the function that loads the value"):
        await cache.load("e", 1000)


async def test_cache_keeps_at_most_max_entries_the_oldest_stored_going_first(monkeypatch):
    """A value per user with no expiry (-1) grew until the worker ran out of memory."""
    cache_module = sys.modules[Cache.__module__]  # (destfnd.functions.cache is the instance)
    monkeypatch.setattr(cache_module, "MAX_ENTRIES", 2_000)
    cache = Cache()
    await cache.load("first", -1, lambda: "v")
    for i in range(20_000):
        await cache.load(f"user-{i}", -1, lambda i=i: i)
        if i % 3_000 == 0:
            await cache.load("first", -1, lambda: "reloaded")  # used, but stored long ago
    assert len(cache._values) <= 2_000
    assert await cache.load("user-19999", -1, lambda: "reloaded") == 19999
    assert await cache.load("user-0", -1, lambda: "reloaded") == "reloaded"
    assert await cache.load("first", -1, lambda: "again") == "again"


async def test_cache_waiters_load_themselves_when_the_loading_call_is_cancelled():
    """A loader's invocation timed out (cancelled): its waiters got "cancelled" too."""
    cache = Cache()
    started = asyncio.Event()

    async def slow() -> str:
        started.set()
        await asyncio.sleep(30)
        return "slow"

    loader = asyncio.create_task(cache.load("k", 1000, slow))
    await started.wait()
    waiter = asyncio.create_task(cache.load("k", 1000, lambda: "fresh"))
    await asyncio.sleep(0)  # the waiter waits on the pending load
    loader.cancel()
    assert await waiter == "fresh"
    with pytest.raises(asyncio.CancelledError):
        await loader


async def test_cache_load_of_a_key_from_its_own_loader_is_an_error_not_a_deadlock():
    cache = Cache()

    async def again() -> str:
        return await cache.load("k", 1000, lambda: "inner")

    with pytest.raises(RuntimeError, match=r"cache.load\('k'\) called from its own loader"):
        await cache.load("k", 1000, again)


def test_cache_loads_once_for_callers_on_threads_with_loops_of_their_own():
    """Plain `def` handlers run on threads and call `asyncio.run(cache.load(...))`: each on a
    loop of its own. They got "Future attached to a different loop" (and were discarded)."""
    import threading

    cache = Cache()
    calls = []

    async def token():
        calls.append(threading.get_ident())
        await asyncio.sleep(0.2)
        return "tok-1"

    results, errors = [], []

    def handler() -> None:
        try:
            results.append(asyncio.run(cache.load("token", 60_000, token)))
        except Exception as exc:  # the test reports it
            errors.append(exc)

    threads = [threading.Thread(target=handler) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == []
    assert results == ["tok-1"] * 8
    assert len(calls) == 1
