from __future__ import annotations

import asyncio

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
    with pytest.raises(TypeError, match="ttl_ms must be a number, got str"):
        await cache.load("k", "1000", lambda: calls.append(1))
    assert calls == []
    assert await cache.load("k", 1000, lambda: "v") == "v"


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
