"""queue: a shorter waiting queue scores higher (the GIE queue scorer).

The queue is the scraped ``waiting`` plus the picks assumed since that scrape. Min-max
normalised over the candidates: 1 for the shortest queue, 0 for the longest, 1 for all
when they are equal. No parameters.
"""

from __future__ import annotations

from ..framework import Candidate, Scorer, Snapshot, inverse_minmax


class Queue(Scorer):
    name = "queue"
    uses_metrics = True

    def score(self, snap: Snapshot, cands: list[Candidate]) -> list[float]:
        return inverse_minmax([c.waiting for c in cands])


PLUGIN = Queue
