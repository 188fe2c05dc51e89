"""top_k: a uniformly random candidate among the ``k`` best totals (default 2).

Between max_score (always the best: herds when many decisions share one view) and
random; ties at the k-th place are all included. ``k`` >= 1.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..framework import Candidate, Picker, Snapshot


@dataclass(frozen=True)
class TopKConfig:
    k: int = 2

    def validate(self) -> list[tuple[str, str]]:
        return [] if self.k >= 1 else [("k", "must be >= 1")]


class TopK(Picker):
    name = "top_k"
    Config = TopKConfig

    def __init__(self, config: TopKConfig | None = None) -> None:
        super().__init__(config or TopKConfig())

    def pick(self, snap: Snapshot, cands: list[Candidate], totals: list[float]) -> Candidate:
        order = sorted(totals, reverse=True)
        cut = order[min(self.config.k, len(order)) - 1]
        return random.choice([c for c, t in zip(cands, totals) if t >= cut])


PLUGIN = TopK
