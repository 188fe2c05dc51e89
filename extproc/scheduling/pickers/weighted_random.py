"""weighted_random: a random candidate, with probability growing with its total score.

Weight = ``exp(sharpness x (total - best))``: the best candidate has weight 1, one that
scores ``1/sharpness`` less has ``1/e``. FlexLB's decode picker is this with KV usage
(``exp(-k x (used - min))``): near-equal endpoints share the traffic, so decisions made
on the same slightly stale view do not all pick the same one. ``sharpness`` default 20;
0 picks uniformly.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from ..framework import Candidate, Picker, Snapshot


@dataclass(frozen=True)
class WeightedRandomConfig:
    sharpness: float = 20.0

    def validate(self) -> list[tuple[str, str]]:
        return [] if self.sharpness >= 0 else [("sharpness", "must be >= 0")]


class WeightedRandom(Picker):
    name = "weighted_random"
    Config = WeightedRandomConfig

    def __init__(self, config: WeightedRandomConfig | None = None) -> None:
        super().__init__(config or WeightedRandomConfig())

    def pick(self, snap: Snapshot, cands: list[Candidate], totals: list[float]) -> Candidate:
        k = self.config.sharpness
        best = max(totals)
        weights = [math.exp(k * (t - best)) for t in totals]
        return random.choices(cands, weights)[0]


PLUGIN = WeightedRandom
