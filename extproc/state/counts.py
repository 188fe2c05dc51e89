"""Cluster-wide in-flight counts for ``global_least_request`` and ``prefix_cache``.

Both policies route to the endpoint with the fewest requests in flight across *all* ai-lb
instances sharing a store, and must pick and count in one atomic step so a burst cannot
herd onto one endpoint (AIBrix #2422). ``pool`` namespaces the counts (route + cluster).

Two implementations: ``LocalCounts`` (``store: memory``: this process is the whole fleet,
so the counts are the core's own ``LocalInflight``) and ``redis_counts.RedisCounts``.
"""

from __future__ import annotations

import random
from typing import Callable, Protocol, Sequence

from .inflight import LocalInflight


class GlobalCounts(Protocol):
    async def pick_least(self, pool: str, candidates: Sequence[str], max_count: int = 0) -> tuple[str | None, int]:
        """Atomically choose the candidate with the fewest in flight (ties at random) and
        count one more on it. Returns (address, its count with this request); address is
        None, and nothing is counted, when even the least loaded is at ``max_count`` (> 0)."""
        ...

    async def incr(self, pool: str, address: str) -> None:
        """Count one more on an endpoint chosen by other means (a prefix match)."""
        ...

    def release(self, pool: str, address: str) -> None:
        """Exactly once per counted request, when its stream ends (synchronous, for
        ``on_done``: local at once, remote soon after)."""
        ...

    async def counts(self, pool: str, candidates: Sequence[str]) -> dict[str, int]: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def least(candidates: Sequence[str], count: Callable[[str], int], rng: random.Random) -> tuple[str, int]:
    """The candidate with the lowest count (ties at random) and that count."""
    low = None
    best: list[str] = []
    for a in candidates:
        n = count(a)
        if low is None or n < low:
            low, best = n, [a]
        elif n == low:
            best.append(a)
    return (best[0] if len(best) == 1 else rng.choice(best)), low or 0


class LocalCounts:
    """``store: memory``. The core counts every pick in ``LocalInflight`` exactly once and
    releases it exactly once, so counting here would count twice: ``incr`` and ``release``
    are no-ops, and a pick is atomic because nothing yields between it and the core's count."""

    def __init__(self, inflight: LocalInflight, rng: random.Random | None = None) -> None:
        self.inflight = inflight
        self._rng = rng or random.Random()

    async def pick_least(self, pool: str, candidates: Sequence[str], max_count: int = 0) -> tuple[str | None, int]:
        addr, low = least(candidates, self.inflight.get, self._rng)
        if max_count > 0 and low >= max_count:
            return None, low
        return addr, low + 1

    async def incr(self, pool: str, address: str) -> None:
        pass

    def release(self, pool: str, address: str) -> None:
        pass

    async def counts(self, pool: str, candidates: Sequence[str]) -> dict[str, int]:
        get = self.inflight.get
        return {a: get(a) for a in candidates}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass
