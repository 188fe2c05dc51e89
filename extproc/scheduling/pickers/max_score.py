"""max_score: the candidate with the highest total score; ties broken at random (so a
burst arriving at an idle fleet spreads instead of herding onto the first). No parameters.
"""

from __future__ import annotations

import random

from ..framework import Candidate, Picker, Snapshot

_EPS = 1e-9


class MaxScore(Picker):
    name = "max_score"

    def pick(self, snap: Snapshot, cands: list[Candidate], totals: list[float]) -> Candidate:
        best = max(totals)
        top = [c for c, t in zip(cands, totals) if t >= best - _EPS]
        return top[0] if len(top) == 1 else random.choice(top)


PLUGIN = MaxScore
