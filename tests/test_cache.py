from __future__ import annotations

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
