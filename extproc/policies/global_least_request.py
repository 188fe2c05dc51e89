"""global_least_request: fewest in-flight requests across every ai-lb instance sharing a
store (Higress's policy), picked and counted in one atomic step.

With ``store: memory`` (and no Redis in ``lb_config``) the counts are this process's;
with Redis they are shared, leased per instance, bounded in wait time and backed by local
counts when Redis is unavailable (see ``state/redis_counts.py``).
``maxRequestCount`` > 0 answers 429 when even the least loaded endpoint is at the cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..core import Decision, Endpoint, Reject
from ..signals.load_index import IndexedSet
from ..state.counts import LocalCounts
from ..state.redis_settings import RedisSettings
from .base import Policy

INDEX_ABOVE = 16  # candidate sets larger than this are read from a load index, not scanned


@dataclass(frozen=True)
class GlobalLeastRequestConfig(RedisSettings):
    maxRequestCount: int = 0   # 0 = no cap
    cleanInterval: int = 60    # minutes; accepted for Higress compatibility (leases replace the sweep)
    lease_ttl: float = 10.0    # seconds a dead instance's counts survive it

    def validate(self) -> list[tuple[str, str]]:
        out = super().validate()
        if self.maxRequestCount < 0:
            out.append(("maxRequestCount", "must be >= 0 (0 = no cap)"))
        if self.lease_ttl <= 0:
            out.append(("lease_ttl", "must be > 0"))
        return out


class GlobalLeastRequest(Policy):
    name = "global_least_request"
    Config = GlobalLeastRequestConfig

    def __init__(self, config: GlobalLeastRequestConfig, env) -> None:
        super().__init__(config, env)
        self.counts = env.stores.counts(config.store_url(env.store_url), config.timeout_s, config.lease_ttl)
        self.pool = env.route.pool
        # With the memory store the counts are the core's own: read the least loaded from
        # an index instead of scanning every candidate (flat cost at 1,000 endpoints).
        self.local = isinstance(self.counts, LocalCounts)
        self.set = IndexedSet(env.load, lambda r: r.requests, index_above=INDEX_ABOVE)

    def on_candidates(self, candidates: Sequence[Endpoint]) -> None:
        self.set.update(candidates)

    async def start(self) -> None:
        await self.counts.start()

    async def close(self) -> None:
        await self.counts.stop()
        self.set.close()

    async def pick(self, ctx, candidates: Sequence[Endpoint]) -> Decision:
        cs = self.set.update(candidates)
        if self.local and cs.indexed:
            return self._pick_indexed(ctx, cs, len(candidates))
        addr, n = await self.counts.pick_least(self.pool, cs.addresses, self.config.maxRequestCount)
        if addr is None:
            return Reject(429, f"all {len(candidates)} endpoints are at maxRequestCount={self.config.maxRequestCount} "
                               f"in-flight requests; retry later")
        ctx.policy_state = addr
        return cs.by_addr.get(addr) or Endpoint(addr)

    def _pick_indexed(self, ctx, cs: IndexedSet, n: int) -> Decision:
        (addr,) = cs.index.least(1)
        cap = self.config.maxRequestCount
        if cap > 0 and cs.index.key(addr) >= cap:
            return Reject(429, f"all {n} endpoints are at maxRequestCount={cap} in-flight requests; retry later")
        return cs.by_addr[addr]  # counted by the core (the memory store's counts are its own)

    def on_done(self, ctx) -> None:
        if ctx.policy_state is not None:
            self.counts.release(self.pool, ctx.policy_state)


POLICY = GlobalLeastRequest
