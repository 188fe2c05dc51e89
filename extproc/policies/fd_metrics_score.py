"""fd_metrics_score (FastDeploy router): the lowest ``running + waiting x waiting-weight``.

FastDeploy reads running and waiting per instance; here they come from each endpoint's
scraped ``/metrics`` (every ``scrape_interval``, off the request path) corrected by the
load assumed since the scrape: picks made after it count as waiting, completions since
are taken off. So consecutive decisions inside one scrape interval see each other.
Composition: ``healthy`` -> ``fd_metrics`` -> ``max_score``.
``lb_config``: ``waiting-weight`` (FastDeploy's key; default 10), ``scrape_interval``,
``stale_after``, ``metrics_path``, ``max_candidates``, ``observe_errors``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..scheduling import spec
from .scheduler import MetricsAwareConfig, ScheduledPolicy


@dataclass(frozen=True)
class FdMetricsScoreConfig(MetricsAwareConfig):
    waiting_weight: float = 10.0

    def validate(self) -> list[tuple[str, str]]:
        out = super().validate()
        if self.waiting_weight < 0:
            out.append(("waiting_weight", "must be >= 0"))
        return out


class FdMetricsScore(ScheduledPolicy):
    name = "fd_metrics_score"
    Config = FdMetricsScoreConfig

    def index_key(self):
        clock, stale, w = self.env.load.clock, self.stale_after, self.config.waiting_weight

        def key(r):
            now = clock()
            return int(r.running(now, stale) + r.waiting(now, stale) * w)
        return key

    def profile_specs(self, config: FdMetricsScoreConfig):
        return ([spec("filter", "healthy")], [spec("scorer", "fd_metrics", waiting_weight=config.waiting_weight)],
                spec("picker", "max_score"))


POLICY = FdMetricsScore
