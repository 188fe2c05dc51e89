"""fd_metrics: FastDeploy's ``fd_metrics_score``: lower ``running + waiting x waiting_weight``
scores higher.

Running and waiting are the scraped numbers with assumed load (picks since the scrape
count as waiting, completions since are taken off running); without a fresh scrape the
endpoint's own in-flight count stands for running. ``waiting_weight`` (FastDeploy's
``waiting-weight``, default 10): how much worse a queued request is than a running one.
Min-max normalised.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..framework import Candidate, Scorer, Snapshot, inverse_minmax


@dataclass(frozen=True)
class FdMetricsConfig:
    waiting_weight: float = 10.0

    def validate(self) -> list[tuple[str, str]]:
        return [] if self.waiting_weight >= 0 else [("waiting_weight", "must be >= 0")]


def fd_score(c: Candidate, waiting_weight: float) -> float:
    return c.running + c.waiting * waiting_weight


class FdMetrics(Scorer):
    name = "fd_metrics"
    uses_metrics = True
    Config = FdMetricsConfig

    def __init__(self, config: FdMetricsConfig | None = None, weight: float = 1.0) -> None:
        super().__init__(config or FdMetricsConfig(), weight)

    def score(self, snap: Snapshot, cands: list[Candidate]) -> list[float]:
        w = self.config.waiting_weight
        return inverse_minmax([fd_score(c, w) for c in cands])


PLUGIN = FdMetrics
