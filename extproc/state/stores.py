"""The state stores of one gateway, shared per store URL so policies on one store share state.

``global_least_request`` and ``prefix_cache`` on one route must see the same in-flight
counts; ``counts`` returns one object per store (``LocalCounts`` over the core's own
in-flight counter for ``memory``; one ``RedisCounts`` per Redis URL and timeout). Redis
connections and prefix indexes are shared the same way. One ``StateStores`` belongs to one
event loop (a Redis client cannot cross loops); the gateway owns it, so tests and
benchmarks that run several gateways in turn get separate state.
"""

from __future__ import annotations

from typing import Any, Callable

from .block_index import BlockIndex
from .counts import GlobalCounts, LocalCounts
from .inflight import LocalInflight
from .prefix_index import MemoryPrefixIndex
from .redis_conn import RedisConn


class StateStores:
    def __init__(self, inflight: LocalInflight | None = None) -> None:
        self.inflight = inflight or LocalInflight()
        # (store, event) -> count: Redis errors answered with local state (local_pick,
        # local_count) and resynchronisations after an outage (resync).
        self.events: dict[tuple[str, str], int] = {}
        self._local = LocalCounts(self.inflight)
        self._conns: dict[tuple[str, float], RedisConn] = {}
        self._counts: dict[tuple[str, float], GlobalCounts] = {}
        self._local_prefix: dict[int, MemoryPrefixIndex] = {}
        self._block: dict[tuple, BlockIndex] = {}
        self._shared: dict[tuple, Any] = {}

    def count(self, store: str, event: str) -> None:
        k = (store, event)
        self.events[k] = self.events.get(k, 0) + 1

    def connection(self, url: str, timeout: float = 0.05) -> RedisConn:
        """One bounded, breaker-guarded connection per (URL, timeout)."""
        key = (url, timeout)
        c = self._conns.get(key)
        if c is None:
            c = self._conns[key] = RedisConn(url, timeout)
        return c

    def redis_urls(self) -> list[str]:
        """The Redis URLs the policies opened connections to (for the start-up probe)."""
        return sorted({url for url, _ in self._conns})

    def counts(self, url: str, timeout: float = 0.05, lease_ttl: float = 10.0) -> GlobalCounts:
        if url == "memory":
            return self._local
        key = (url, timeout)
        c = self._counts.get(key)
        if c is None:
            from .redis_counts import RedisCounts

            c = self._counts[key] = RedisCounts(self.connection(url, timeout), lease_ttl=lease_ttl, events=self.count)
        return c

    def local_prefix_index(self, max_entries: int) -> MemoryPrefixIndex:
        """The process-local prefix index (kept across reloads; keys are namespaced by pool)."""
        idx = self._local_prefix.get(max_entries)
        if idx is None:
            idx = self._local_prefix[max_entries] = MemoryPrefixIndex(max_entries)
        return idx

    def block_index(self, block_bytes: int, max_blocks: int, ttl: float) -> BlockIndex:
        """The block-level prefix tree for prompts cut at ``block_bytes`` (kept across
        reloads; chain keys are seeded by model, so routes and models never mix)."""
        key = (block_bytes, max_blocks, ttl)
        idx = self._block.get(key)
        if idx is None:
            idx = self._block[key] = BlockIndex(max_blocks, ttl)
        return idx

    def shared(self, key: tuple, factory: Callable[[], Any]) -> Any:
        """One object per ``key`` for this gateway, made by ``factory`` on first use and kept
        across reloads (e.g. the KV-event subscribers: a port can be bound once). Objects
        with a ``close()`` are closed with the stores."""
        obj = self._shared.get(key)
        if obj is None:
            obj = self._shared[key] = factory()
        return obj

    async def close(self) -> None:
        for obj in self._shared.values():
            close = getattr(obj, "close", None)
            if close is not None:
                r = close()
                if hasattr(r, "__await__"):
                    await r
        self._shared.clear()
        for c in self._conns.values():
            await c.close()
        self._conns.clear()
        self._counts.clear()
