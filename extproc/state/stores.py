"""Shared store instances, so policies on the same store share state.

``global_least_request`` and ``prefix_cache`` on one route must see the same in-flight
counts; ``counts_for`` returns one object per store URL (one process-wide memory store;
one Redis-backed store per Redis URL and timeout).
"""

from __future__ import annotations

from .counts import GlobalCounts, MemoryCounts

_MEMORY_COUNTS = MemoryCounts()
_REDIS_COUNTS: dict[tuple[str, float], GlobalCounts] = {}


def counts_for(url: str, timeout: float = 0.05, lease_ttl: float = 10.0) -> GlobalCounts:
    if url == "memory":
        return _MEMORY_COUNTS
    key = (url, timeout)
    c = _REDIS_COUNTS.get(key)
    if c is None:
        from .redis_counts import RedisCounts

        c = _REDIS_COUNTS[key] = RedisCounts(url, timeout=timeout, lease_ttl=lease_ttl, fallback=MemoryCounts())
    return c
