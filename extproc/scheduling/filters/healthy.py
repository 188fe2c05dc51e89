"""healthy: leave out endpoints ejected for upstream errors.

An endpoint whose requests failed (5xx, connection failures) ``eject_after`` times in a
row is ejected by the load view for 1 s, doubling per repeat up to 30 s; it comes back
on its own and is probed by the next picks. Envoy's health checks and outlier detection
do the same at Envoy's pace; this reacts within the policy's own traffic, so a backend
that fails fast (and so always looks idle) stops attracting requests at once.
No parameters.
"""

from __future__ import annotations

from ..framework import Candidate, Filter, Snapshot


class Healthy(Filter):
    name = "healthy"

    def filter(self, snap: Snapshot, cands: list[Candidate]) -> list[Candidate]:
        now = snap.now
        return [c for c in cands if not c.load.ejected(now)]


PLUGIN = Healthy
