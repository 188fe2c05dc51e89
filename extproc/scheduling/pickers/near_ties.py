"""near_ties: a random candidate among those within a tolerance of the best (FlexLB).

FlexLB picks the minimum estimated TTFT, but among near-ties (within max(10 %, 20 ms)
of the best) picks at random, so concurrent decisions on the same view do not all herd
onto one worker. When a TTFT estimate is in the snapshot (the ``estimated_ttft``
scorer), the tolerance is on it: ``rel`` (default 0.1) and ``abs_s`` seconds (default
0.02); otherwise on the total score (``rel`` of the best total).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..framework import Candidate, Picker, Snapshot


@dataclass(frozen=True)
class NearTiesConfig:
    rel: float = 0.1
    abs_s: float = 0.02

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if self.rel < 0:
            out.append(("rel", "must be >= 0"))
        if self.abs_s < 0:
            out.append(("abs_s", "must be >= 0"))
        return out


class NearTies(Picker):
    name = "near_ties"
    Config = NearTiesConfig

    def __init__(self, config: NearTiesConfig | None = None) -> None:
        super().__init__(config or NearTiesConfig())

    def pick(self, snap: Snapshot, cands: list[Candidate], totals: list[float]) -> Candidate:
        est = snap.notes.get("ttft")
        c = self.config
        if est and all(x.address in est for x in cands):
            vals = [est[x.address][0] for x in cands]
            best = min(vals)
            cut = best + max(c.rel * best, c.abs_s)
            return random.choice([x for x, v in zip(cands, vals) if v <= cut])
        best = max(totals)
        return random.choice([x for x, t in zip(cands, totals) if t >= best - c.rel * abs(best)])


PLUGIN = NearTies
