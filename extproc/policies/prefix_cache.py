"""prefix_cache: send a prompt to the endpoint that served its longest known prefix.

Higress's ``prefix_cache`` done properly (see docs/policies/prefix_cache.md):

* The prompt becomes a chain of keys, one per chat segment or completions chunk
  (``extproc.signals.prefix_keys``: ordered, namespaced by route, cluster and model).
* The index walks the chain while keys exist and point at a healthy candidate, refreshes
  their TTL, and routes to the deepest match; with no match it picks the least loaded
  endpoint from the in-flight counts shared with ``global_least_request``. The depths
  after the match (including a stale one) are then written with the chosen endpoint.
* With Redis, one decision is one round trip: a single script matches, applies the load
  guard, picks, counts and records (``state/redis_prefix.py``). Redis slow or down: that
  decision uses the process-local index and this instance's counts; never fails a request.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Sequence

from ..core import Decision, Endpoint, Fallback
from ..signals.load_index import IndexedSet
from ..signals.prefix_keys import request_keys
from ..state.counts import LocalCounts
from ..state.redis_conn import RedisUnavailable
from ..state.redis_prefix import RedisPrefixPick
from ..state.redis_settings import RedisSettings
from .base import Policy

log = logging.getLogger("ai_lb.prefix_cache")


@dataclass(frozen=True)
class PrefixCacheConfig(RedisSettings):
    # Higress fields: the Redis ones (RedisSettings; Redis is used only when serviceFQDN is
    # set, otherwise the global ``store``), and the key TTL.
    redisKeyTTL: int = 1800  # seconds
    # ours
    chunk_chars: int = 256  # /v1/completions prompt chunk size
    # A prefix match is ignored (least loaded wins) when its endpoint has more than
    # balance_abs_threshold requests in flight above the least loaded one AND more than
    # balance_rel_threshold times as many: affinity must not pile a hot prefix onto one server.
    balance_abs_threshold: int = 8
    balance_rel_threshold: float = 1.5
    max_depth: int = 1000  # at most this many chained keys per request
    max_local_entries: int = 100_000  # memory index bound (LRU)

    def validate(self) -> list[tuple[str, str]]:
        out = super().validate()
        if self.redisKeyTTL <= 0:
            out.append(("redisKeyTTL", "must be > 0 (seconds)"))
        if self.chunk_chars <= 0:
            out.append(("chunk_chars", "must be > 0"))
        if self.max_depth <= 0:
            out.append(("max_depth", "must be > 0"))
        if self.balance_abs_threshold < 0:
            out.append(("balance_abs_threshold", "must be >= 0"))
        if self.balance_rel_threshold < 1:
            out.append(("balance_rel_threshold", "must be >= 1"))
        if self.max_local_entries <= 0:
            out.append(("max_local_entries", "must be > 0"))
        return out


# -- the policy ------------------------------------------------------------------------
class PrefixCache(Policy):
    name = "prefix_cache"
    Config = PrefixCacheConfig
    needs_body = True

    def __init__(self, config: PrefixCacheConfig, env) -> None:
        super().__init__(config, env)
        self.cluster = env.route.endpoints.cluster or "static"
        self.pool = env.route.pool
        self.ttl = float(config.redisKeyTTL)
        store_url = config.store_url(env.store_url)
        # The process-local index survives reloads (it belongs to the gateway's stores).
        self.local = env.stores.local_prefix_index(config.max_local_entries)
        self.counts = env.stores.counts(store_url, config.timeout_s)
        self.redis = None if isinstance(self.counts, LocalCounts) else RedisPrefixPick(self.counts)
        self.stats = {"hit": 0, "miss": 0, "index_fallback": 0, "imbalanced": 0}
        self._counts_started = False
        # Memory store: the counts are the core's own, read from an index (flat in fleet size).
        self.local_counts = isinstance(self.counts, LocalCounts)
        self.set = IndexedSet(env.load, lambda r: r.requests, index_above=16)

    def on_candidates(self, candidates: Sequence[Endpoint]) -> None:
        self.set.update(candidates)

    async def start(self) -> None:
        await self.counts.start()  # RedisCounts: the lease heartbeat, shared by its users
        self._counts_started = True

    async def close(self) -> None:
        self.set.close()
        if self._counts_started:
            self._counts_started = False
            await self.counts.stop()

    async def pick(self, ctx, candidates: Sequence[Endpoint]) -> Decision:
        if not candidates:
            return Fallback("no_healthy_endpoints")
        doc = ctx.json()  # BodyError -> the core falls back with its reason
        c = self.config
        keys = request_keys(doc, self.env.route.name, self.cluster, c.chunk_chars, c.max_depth)
        cs = self.set.update(candidates)
        by_addr, healthy = cs.by_addr, cs.addresses
        if self.redis is not None:
            try:
                host, depth, imbalanced = await self.redis.pick(self.pool, keys, healthy, self.ttl,
                                                                c.balance_abs_threshold, c.balance_rel_threshold)
            except RedisUnavailable:
                self.stats["index_fallback"] += 1  # decided below from the local index and counts
            else:
                self.stats["imbalanced"] += imbalanced
                self.stats["hit" if depth else "miss"] += 1
                ctx.policy_state = (self.pool, host)
                self.local.record_now(self.pool, keys, host, self.ttl)  # write-through: affinity survives an outage
                return by_addr[host]
        depth, host = self.local.match_now(self.pool, keys, by_addr, self.ttl) if keys else (0, None)
        if host is None or host not in by_addr:
            depth, host = 0, None
        elif len(healthy) > 1 and await self._overloaded(host, cs):
            self.stats["imbalanced"] += 1
            depth, host = 0, None  # keys are re-recorded below with the less loaded endpoint

        counted = True
        try:
            if host is not None:
                await self.counts.incr(self.pool, host)
            elif self.local_counts and cs.indexed:
                host = cs.index.least(1)[0]
            else:
                host, _ = await self.counts.pick_least(self.pool, healthy)
        except Exception as e:  # noqa: BLE001 - counts store trouble must not fail the request
            log.warning("prefix_cache %s: in-flight counts failed (%r); not counted", self.pool, e)
            counted = False
        if host is None:  # pick_least refused or failed
            host = random.choice(healthy)
            counted = False
        self.stats["hit" if depth else "miss"] += 1
        ctx.policy_state = (self.pool, host) if counted else None

        rest = keys[depth:]
        if rest:
            self.local.record_now(self.pool, rest, host, self.ttl)
        return by_addr[host]

    async def _overloaded(self, host: str, cs: IndexedSet) -> bool:
        if self.local_counts and cs.indexed:
            mine, low = self.env.load.record(host).requests, cs.index.key(cs.index.least(1)[0])
        else:
            try:
                counts = await self.counts.counts(self.pool, cs.addresses)
            except Exception:  # noqa: BLE001 - no load view: keep the affinity
                return False
            mine, low = counts.get(host, 0), min(counts.values())
        c = self.config
        return mine - low > c.balance_abs_threshold and mine > c.balance_rel_threshold * low

    def on_done(self, ctx) -> None:
        st = ctx.policy_state
        if st:
            ctx.policy_state = None
            self.counts.release(*st)  # exactly once; local now, Redis right after


POLICY = PrefixCache
