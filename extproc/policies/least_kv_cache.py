"""least_kv_cache (FlexLB's decode strategy): favour low KV-cache usage among endpoints with room.

FlexLB picks the decode worker with the least KV-cache usage; later versions pick at
random with weight ``exp(-k x (used - min))`` over workers with room, so decisions made
on the same view spread over near-equal workers. Composition: ``healthy`` -> ``kv_room``
(usage below ``max_usage``) -> ``kv_cache`` (usage with the blocks of assumed picks) ->
``weighted_random`` (``sharpness`` = k). ``lb_config``: ``max_usage`` (0.95),
``sharpness`` (100: a 1 % usage gap weighs 1/e), ``requests_weight``, ``scrape_interval``,
``stale_after``, ``metrics_path``, ``max_candidates``, ``observe_errors``.

``requests_weight`` (default 0.05; 0 = FlexLB's pure KV choice) adds the ``requests``
scorer (fewest in flight from this process, min-max normalised) at that weight: while
the fleet's KV usage is low and near-equal (a 400-token prompt is 0.1 % of an H100's
cache), pure KV weighting is a uniform random choice, which lost to round robin on
TTFT p90 (1.31x, no-sharing at 0.8 load, docs/benchmarks.md); with the tie-break,
near-equal KV goes to the endpoint with fewer requests, and a KV gap of more than 5
points still decides.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..scheduling import spec
from .scheduler import MetricsAwareConfig, ScheduledPolicy


@dataclass(frozen=True)
class LeastKvCacheConfig(MetricsAwareConfig):
    max_usage: float = 0.95
    sharpness: float = 100.0
    requests_weight: float = 0.05

    def validate(self) -> list[tuple[str, str]]:
        out = super().validate()
        if not 0 < self.max_usage <= 1:
            out.append(("max_usage", "must be in (0, 1]"))
        if self.sharpness < 0:
            out.append(("sharpness", "must be >= 0"))
        if self.requests_weight < 0:
            out.append(("requests_weight", "must be >= 0"))
        return out


class LeastKvCache(ScheduledPolicy):
    name = "least_kv_cache"
    Config = LeastKvCacheConfig

    def index_key(self):
        clock, stale = self.env.load.clock, self.stale_after

        def key(r):
            kv = r.kv(clock(), stale)
            return 100 if kv is None else int(kv * 100)
        return key

    def profile_specs(self, config: LeastKvCacheConfig):
        return ([spec("filter", "healthy"), spec("filter", "kv_room", max_usage=config.max_usage)],
                [spec("scorer", "kv_cache"), spec("scorer", "requests", weight=config.requests_weight)],
                spec("picker", "weighted_random", sharpness=config.sharpness))


POLICY = LeastKvCache
