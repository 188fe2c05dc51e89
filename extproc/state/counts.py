"""Cluster-wide in-flight counts for ``global_least_request`` and ``prefix_cache``.

Both policies route to the endpoint with the fewest requests in flight across *all* ai-lb
instances sharing a store, and must pick and count in one atomic step so a burst cannot
herd onto one endpoint (AIBrix #2422). ``pool`` namespaces the counts (route + cluster).
"""

from __future__ import annotations

from typing import Protocol, Sequence


class GlobalCounts(Protocol):
    async def pick_least(self, pool: str, candidates: Sequence[str], max_count: int = 0) -> tuple[str | None, int]:
        """Atomically choose the candidate with the fewest in flight (ties at random) and
        count one more on it. Returns (address, its count after the increment); address is
        None, and nothing is counted, when even the least loaded is at ``max_count`` (> 0)."""
        ...

    async def incr(self, pool: str, address: str) -> None:
        """Count one more on an endpoint chosen by other means (a prefix match)."""
        ...

    async def decr(self, pool: str, address: str) -> None:
        """Exactly once per counted request, when its stream ends."""
        ...

    def release(self, pool: str, address: str) -> None:
        """``decr`` for synchronous hooks (``on_done``): local at once, remote soon after."""
        ...

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def counts(self, pool: str, candidates: Sequence[str]) -> dict[str, int]: ...


class MemoryCounts:
    """Process-local implementation: the default store, and the fallback of the Redis one."""

    def __init__(self, rng=None) -> None:
        import random

        self._n: dict[str, dict[str, int]] = {}
        self._rng = rng or random.Random()

    async def pick_least(self, pool: str, candidates: Sequence[str], max_count: int = 0) -> tuple[str | None, int]:
        return self.pick_least_now(pool, candidates, max_count)

    def pick_least_now(self, pool: str, candidates: Sequence[str], max_count: int = 0) -> tuple[str | None, int]:
        counts = self._n.setdefault(pool, {})
        low = min(counts.get(a, 0) for a in candidates)
        if max_count > 0 and low >= max_count:
            return None, low
        best = [a for a in candidates if counts.get(a, 0) == low]
        choice = best[0] if len(best) == 1 else self._rng.choice(best)
        counts[choice] = low + 1
        return choice, low + 1

    async def incr(self, pool: str, address: str) -> None:
        self.incr_now(pool, address)

    def incr_now(self, pool: str, address: str) -> None:
        counts = self._n.setdefault(pool, {})
        counts[address] = counts.get(address, 0) + 1

    async def decr(self, pool: str, address: str) -> None:
        self.decr_now(pool, address)

    def decr_now(self, pool: str, address: str) -> None:
        counts = self._n.get(pool)
        if counts is None:
            return
        n = counts.get(address, 0) - 1
        if n > 0:
            counts[address] = n
        else:
            counts.pop(address, None)  # never negative

    def release(self, pool: str, address: str) -> None:
        self.decr_now(pool, address)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def counts(self, pool: str, candidates: Sequence[str]) -> dict[str, int]:
        c = self._n.get(pool, {})
        return {a: c.get(a, 0) for a in candidates}
