"""The process-local prefix index of ``prefix_cache``: chained prefix keys -> the endpoint
that served them (the Redis side is one script: ``state/redis_prefix.py``).

A request's prompt is a chain of keys (key *i* is a digest over segments 1..i, see
``signals/prefix_keys.py``). One decision is two calls:

``match_now(tag, keys, healthy, ttl)``
    Walk the chain from depth 1 while the key exists *and* its endpoint is among the
    healthy candidates; refresh the TTL of every matched key; return (depth, endpoint)
    of the deepest such key, or (0, None).
``record_now(tag, keys, endpoint, ttl)``
    Write ``keys`` (the depths after the match) with the chosen endpoint. A key that
    pointed at a stale endpoint is overwritten here, so no part of the chain is left
    behind under a wrong endpoint.

``tag`` is the route|cluster namespace (the pool).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Collection, Sequence



class MemoryPrefixIndex:
    """Process-local index: a dict with per-key expiry, bounded by LRU eviction."""

    def __init__(self, max_entries: int = 100_000, clock=time.monotonic) -> None:
        self.max_entries = max_entries
        self._d: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()
        self._clock = clock

    def __len__(self) -> int:
        return len(self._d)

    def match_now(self, tag: str, keys: Sequence[str], healthy: Collection[str], ttl: float) -> tuple[int, str | None]:
        """``healthy``: anything with fast ``in`` (a set or dict is used as it is)."""
        now = self._clock()
        ok = healthy if isinstance(healthy, (set, frozenset, dict)) else set(healthy)
        d = self._d
        depth, host = 0, None
        for i, k in enumerate(keys):
            kk = (tag, k)
            v = d.get(kk)
            if v is None:
                break
            if v[1] <= now:  # expired
                del d[kk]
                break
            if v[0] not in ok:  # stale: the walk stops; record() overwrites it
                break
            d[kk] = (v[0], now + ttl)
            d.move_to_end(kk)
            depth, host = i + 1, v[0]
        return depth, host

    def record_now(self, tag: str, keys: Sequence[str], endpoint: str, ttl: float) -> None:
        exp = self._clock() + ttl
        d = self._d
        for k in keys:
            kk = (tag, k)
            d[kk] = (endpoint, exp)
            d.move_to_end(kk)
        while len(d) > self.max_entries:
            d.popitem(last=False)

    def get(self, tag: str, key: str) -> str | None:
        """The live endpoint recorded under a key (tests, debugging)."""
        v = self._d.get((tag, key))
        return v[0] if v is not None and v[1] > self._clock() else None
