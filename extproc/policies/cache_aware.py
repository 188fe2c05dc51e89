"""cache_aware (FastDeploy router): prefix hit ratio and load, or fewest tokens when imbalanced.

FastDeploy's default prefill policy, at block level:

* **Balanced fleet**: lowest ``(1 - hit) x hit-ratio-weight + load / max_load x
  load-balance-weight`` wins, i.e. the framework's ``prefix`` scorer (hit ratio = leading
  prompt blocks the endpoint holds / prompt blocks; every endpoint's match counts) with
  weight ``hit-ratio-weight`` plus the ``load`` scorer (running + waiting x
  ``waiting-weight``, assumed load included) with weight ``load-balance-weight``. A weight
  of 0 switches its term off.
* **Imbalanced fleet** (``max - min > balance-abs-threshold`` and ``(max - min) / max >
  balance-rel-threshold`` over the candidates' loads): ``process_tokens`` (fewest prompt
  tokens in flight), so affinity never piles work onto one server.

Blocks are ``cache-block-size`` tokens of the prompt text (x 4 bytes per token; default
16 tokens = 64 bytes, so sharing inside one message counts); the block tree lives
``eviction-duration-mins`` unused and is swept every ``eviction-interval-secs``; at most
``max-blocks`` nodes (least recently used evicted first). Keys are deterministic, so two
ai-lb instances agree. FastDeploy's own defaults for the thresholds are 1 and 0.2, which
flip to process_tokens at almost any load; ours are 64 (sglang-router's) and 0.5. The
load counts a waiting request 10 times (``waiting-weight``), so a threshold of 8 was
crossed by one waiting request: under cache pressure at 0.9 load the policy then spent
its time in process_tokens, lost its locality, and the misses kept the fleet imbalanced
(hit rate 59 % against sglang-router's 90 %, TTFT p90 758 ms against 55 ms; at 32: 69 %
and 1,079 ms; at 64: 89.9 % and 68 ms, docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core import Fallback
from ..scheduling import Profile, spec
from .scheduler import MetricsAwareConfig, ScheduledPolicy

BYTES_PER_TOKEN = 4


@dataclass(frozen=True)
class CacheAwareConfig(MetricsAwareConfig):
    balance_abs_threshold: float = 64.0
    balance_rel_threshold: float = 0.5
    hit_ratio_weight: float = 1.0
    load_balance_weight: float = 0.05
    waiting_weight: float = 10.0
    cache_block_size: int = 16            # tokens per block
    eviction_interval_secs: float = 60.0
    eviction_duration_mins: float = 30.0
    max_blocks: int = 500_000

    def validate(self) -> list[tuple[str, str]]:
        p = super().validate()
        for f in ("balance_abs_threshold", "hit_ratio_weight", "load_balance_weight", "waiting_weight"):
            if getattr(self, f) < 0:
                p.append((f, "must be >= 0"))
        if not 0 <= self.balance_rel_threshold <= 1:
            p.append(("balance_rel_threshold", "must be in [0, 1]"))
        if not 2 <= self.cache_block_size <= 1024:
            p.append(("cache_block_size", "must be 2..1024 tokens"))
        if self.eviction_interval_secs <= 0:
            p.append(("eviction_interval_secs", "must be > 0"))
        if self.eviction_duration_mins <= 0:
            p.append(("eviction_duration_mins", "must be > 0"))
        if self.max_blocks < 1:
            p.append(("max_blocks", "must be >= 1"))
        return p


class CacheAware(ScheduledPolicy):
    name = "cache_aware"
    Config = CacheAwareConfig

    def __init__(self, config: CacheAwareConfig, env) -> None:
        super().__init__(config, env)
        self.balance = Profile([spec("filter", "healthy").build()], [spec("scorer", "tokens").build()],
                               spec("picker", "max_score").build())
        self.prefix = next(s for s in self.profile.plugins if s.name == "prefix") if config.hit_ratio_weight > 0 \
            else None
        self.stats.update({"cache": 0, "imbalanced": 0})

    def profile_specs(self, c: CacheAwareConfig):
        block = c.cache_block_size * BYTES_PER_TOKEN
        block -= block % 8
        scorers = [spec("scorer", "prefix", weight=c.hit_ratio_weight, block_bytes=block, max_blocks=c.max_blocks,
                        ttl=c.eviction_duration_mins * 60, sweep_interval=c.eviction_interval_secs),
                   spec("scorer", "load", weight=c.load_balance_weight, waiting_weight=c.waiting_weight)]
        return [spec("filter", "healthy")], scorers, spec("picker", "max_score")

    def imbalanced(self, snap) -> bool:
        w = self.config.waiting_weight
        loads = [c.running + c.waiting * w for c in snap.candidates]
        lo, hi = min(loads), max(loads)
        c = self.config
        return hi - lo > c.balance_abs_threshold and (hi - lo) / hi > c.balance_rel_threshold

    def decide(self, ctx, candidates):
        if not candidates:
            return Fallback("no_healthy_endpoints")
        snap = self.scheduler.snapshot(ctx, candidates)
        if self.imbalanced(snap):
            self.stats["imbalanced"] += 1
            chosen = self.balance.run(snap)
        else:
            self.stats["cache"] += 1
            chosen = self.profile.run(snap)
        if chosen is None:
            return Fallback(self.fallback_reason)
        ctx.prompt_tokens = snap.prompt_tokens
        for p in self.profile.plugins:   # the prefix tree learns where the prompt went, either way
            p.picked(snap, chosen)
        if self.prefix is not None:
            k = "hit" if self.prefix.match(snap).depth(chosen.address) else "miss"
            self.stats[k] = self.stats.get(k, 0) + 1
        return chosen.endpoint


POLICY = CacheAware
