"""queue_below: keep endpoints whose estimated waiting queue is below ``threshold``.

The queue is the scraped ``waiting`` (vLLM ``num_requests_waiting``, SGLang
``num_queue_reqs``) plus the picks assumed since that scrape. ``threshold`` (default 50,
the GIE/Higress "queueing threshold").
"""

from __future__ import annotations

from dataclasses import dataclass

from ..framework import Candidate, Filter, Snapshot


@dataclass(frozen=True)
class QueueBelowConfig:
    threshold: float = 50

    def validate(self) -> list[tuple[str, str]]:
        return [] if self.threshold > 0 else [("threshold", "must be > 0")]


class QueueBelow(Filter):
    name = "queue_below"
    uses_metrics = True
    Config = QueueBelowConfig

    def filter(self, snap: Snapshot, cands: list[Candidate]) -> list[Candidate]:
        t = self.config.threshold
        return [c for c in cands if c.waiting < t]


PLUGIN = QueueBelow
