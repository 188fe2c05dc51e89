"""Prefix index for ``prefix_cache``: chained prefix keys -> the endpoint that served them.

A request's prompt is a chain of keys (key *i* is a digest over segments 1..i, see
``policies/prefix_cache.py``). One decision is two calls:

``match(tag, keys, healthy, ttl)``
    Walk the chain from depth 1 while the key exists *and* its endpoint is among the
    healthy candidates; refresh the TTL of every matched key; return (depth, endpoint)
    of the deepest such key, or (0, None).
``record(tag, keys, endpoint, ttl)``
    Write ``keys`` (the depths after the match) with the chosen endpoint. A key that
    pointed at a stale endpoint is overwritten here, so no part of the chain is left
    behind under a wrong endpoint.

``tag`` is the route|cluster namespace; the Redis implementation puts it in a hash tag
so every key of a decision lives in one Redis Cluster slot.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Collection, Protocol, Sequence

from .redis_conn import RedisConn


class PrefixIndex(Protocol):
    async def match(self, tag: str, keys: Sequence[str], healthy: Sequence[str], ttl: float) -> tuple[int, str | None]: ...

    async def record(self, tag: str, keys: Sequence[str], endpoint: str, ttl: float) -> None: ...


class MemoryPrefixIndex:
    """Process-local index: a dict with per-key expiry, bounded by LRU eviction."""

    def __init__(self, max_entries: int = 100_000, clock=time.monotonic) -> None:
        self.max_entries = max_entries
        self._d: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()
        self._clock = clock

    def __len__(self) -> int:
        return len(self._d)

    async def match(self, tag: str, keys: Sequence[str], healthy: Sequence[str], ttl: float) -> tuple[int, str | None]:
        return self.match_now(tag, keys, healthy, ttl)

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

    async def record(self, tag: str, keys: Sequence[str], endpoint: str, ttl: float) -> None:
        self.record_now(tag, keys, endpoint, ttl)

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


# KEYS = the chain, shallowest first; ARGV[1] = ttl (seconds); ARGV[2..] = healthy endpoints.
_MATCH = """
local healthy = {}
for i = 2, #ARGV do healthy[ARGV[i]] = true end
local depth, host = 0, ''
for i = 1, #KEYS do
  local h = redis.call('GET', KEYS[i])
  if not h or not healthy[h] then break end
  redis.call('EXPIRE', KEYS[i], ARGV[1])
  depth, host = i, h
end
return {depth, host}
"""

# KEYS = keys to write; ARGV[1] = endpoint; ARGV[2] = ttl (seconds).
_RECORD = """
for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[1], 'EX', ARGV[2]) end
return #KEYS
"""


def _hash_tag(tag: str) -> str:
    # Braces inside the tag would end the hash tag early (and split the slot).
    return "{" + tag.replace("{", "(").replace("}", ")") + "}"


class RedisPrefixIndex:
    """Keys ``ai-lb:pc:{route|cluster}:<hex digest>``, value = endpoint, TTL = redisKeyTTL.

    Each call is one Lua script (atomic, one round trip), bounded by ``conn.call``:
    a slow or dead Redis raises ``RedisUnavailable`` after ``timeout``.
    """

    PREFIX = "ai-lb:pc:"

    def __init__(self, conn: RedisConn) -> None:
        self.conn = conn
        self._match = conn.client.register_script(_MATCH)
        self._record = conn.client.register_script(_RECORD)

    def key(self, tag: str, key: str) -> str:
        return f"{self.PREFIX}{_hash_tag(tag)}:{key}"

    async def match(self, tag: str, keys: Sequence[str], healthy: Sequence[str], ttl: float) -> tuple[int, str | None]:
        if not keys:
            return 0, None
        rk = [self.key(tag, k) for k in keys]
        args = [max(1, int(ttl)), *healthy]
        depth, host = await self.conn.call(lambda: self._match(keys=rk, args=args))
        depth = int(depth)
        if isinstance(host, bytes):
            host = host.decode()
        return depth, (host or None) if depth else None

    async def record(self, tag: str, keys: Sequence[str], endpoint: str, ttl: float) -> None:
        if not keys:
            return
        rk = [self.key(tag, k) for k in keys]
        await self.conn.call(lambda: self._record(keys=rk, args=[endpoint, max(1, int(ttl))]))
