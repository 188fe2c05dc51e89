"""Shared store instances, so policies on the same store share state.

``global_least_request`` and ``prefix_cache`` on one route must see the same in-flight
counts; ``counts_for`` returns one object per store URL (one process-wide memory store;
one Redis-backed store per Redis URL and timeout).
"""

from __future__ import annotations

import asyncio
import weakref

from .counts import GlobalCounts, MemoryCounts

# Per event loop: one process normally has one, but tests and benchmarks run several in
# turn, and Redis clients (and the counts of requests they track) belong to one loop.
_STORES: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict]" = weakref.WeakKeyDictionary()


def counts_for(url: str, timeout: float = 0.05, lease_ttl: float = 10.0) -> GlobalCounts:
    stores = _STORES.setdefault(asyncio.get_running_loop(), {})
    if url == "memory":
        c = stores.get("memory")
        if c is None:
            c = stores["memory"] = MemoryCounts()
        return c
    key = (url, timeout)
    c = stores.get(key)
    if c is None:
        from .redis_counts import RedisCounts

        c = stores[key] = RedisCounts(url, timeout=timeout, lease_ttl=lease_ttl, fallback=MemoryCounts())
    return c
