"""estimated_ttft (FlexLB's prefill strategy): the endpoint with the shortest predicted TTFT.

For every candidate, FlexLB predicts the request's time to first token there: the prefill
of its *uncached* tokens (cached ones found by matching the prompt's block chain against
what each worker holds; a cached token still costs ``hit_cost``, 0.3 of one) plus the
time to drain the work already sent there and not yet done, and running sequences'
slowdown. The cost model is calibrated online from the TTFT ai-lb observes on a
``sample`` of responses (``signals.ttft_model``). Near-ties (within ``max(rel x best,
abs_s)``, FlexLB's max(10 %, 20 ms)) are broken at random, so concurrent decisions do
not herd. Composition: ``healthy`` -> ``estimated_ttft`` -> ``near_ties``.
``lb_config``: ``hit_cost``, ``sample``, ``rel``, ``abs_s``, ``cache_block_size``
(tokens, as cache_aware), ``max_blocks``, ``eviction_duration_mins``, plus the scrape
settings (running sequences are read with assumed load) and ``max_candidates``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..scheduling import spec
from .cache_aware import BYTES_PER_TOKEN
from .scheduler import MetricsAwareConfig, ScheduledPolicy


@dataclass(frozen=True)
class EstimatedTtftConfig(MetricsAwareConfig):
    hit_cost: float = 0.3
    sample: float = 0.1
    rel: float = 0.1
    abs_s: float = 0.02
    cache_block_size: int = 16
    max_blocks: int = 500_000
    eviction_duration_mins: float = 30.0

    def validate(self) -> list[tuple[str, str]]:
        p = super().validate()
        if not 0 <= self.hit_cost <= 1:
            p.append(("hit_cost", "must be in [0, 1]"))
        if not 0 <= self.sample <= 1:
            p.append(("sample", "must be in [0, 1]"))
        if self.rel < 0 or self.abs_s < 0:
            p.append(("rel" if self.rel < 0 else "abs_s", "must be >= 0"))
        if not 2 <= self.cache_block_size <= 1024:
            p.append(("cache_block_size", "must be 2..1024 tokens"))
        if self.max_blocks < 1 or self.eviction_duration_mins <= 0:
            p.append(("max_blocks" if self.max_blocks < 1 else "eviction_duration_mins", "must be > 0"))
        return p


class EstimatedTtft(ScheduledPolicy):
    name = "estimated_ttft"
    Config = EstimatedTtftConfig

    def profile_specs(self, c: EstimatedTtftConfig):
        block = c.cache_block_size * BYTES_PER_TOKEN
        block -= block % 8
        return ([spec("filter", "healthy")],
                [spec("scorer", "estimated_ttft", hit_cost=c.hit_cost, sample=c.sample, block_bytes=block,
                      max_blocks=c.max_blocks, ttl=c.eviction_duration_mins * 60)],
                spec("picker", "near_ties", rel=c.rel, abs_s=c.abs_s))


POLICY = EstimatedTtft
