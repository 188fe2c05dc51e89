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
from ..state.redis_settings import RedisSettings
from .base import Policy


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

    async def start(self) -> None:
        await self.counts.start()

    async def close(self) -> None:
        await self.counts.stop()

    async def pick(self, ctx, candidates: Sequence[Endpoint]) -> Decision:
        addr, n = await self.counts.pick_least(self.pool, [e.address for e in candidates], self.config.maxRequestCount)
        if addr is None:
            return Reject(429, f"all {len(candidates)} endpoints are at maxRequestCount={self.config.maxRequestCount} "
                               f"in-flight requests; retry later")
        ctx.policy_state = addr
        for e in candidates:
            if e.address == addr:
                return e
        return Endpoint(addr)

    def on_done(self, ctx) -> None:
        if ctx.policy_state is not None:
            self.counts.release(self.pool, ctx.policy_state)


POLICY = GlobalLeastRequest
