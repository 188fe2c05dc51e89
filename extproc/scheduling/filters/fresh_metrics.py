"""fresh_metrics: keep endpoints whose metrics scrape is fresh.

An endpoint never scraped, or whose last good scrape is older than the profile's
``stale_after``, is *unknown*: deciding on a stale zero would herd onto it. Strict: when
no candidate has fresh metrics the decision falls back to Envoy's load balancing
(``metrics_unavailable``). Unknown endpoints are counted as ``stale_endpoints``. No
parameters.
"""

from __future__ import annotations

from ..framework import Candidate, Filter, Snapshot


class FreshMetrics(Filter):
    name = "fresh_metrics"
    uses_metrics = True
    strict = True

    def filter(self, snap: Snapshot, cands: list[Candidate]) -> list[Candidate]:
        kept = [c for c in cands if c.metrics is not None]
        if len(kept) < len(cands):
            snap.count("stale_endpoints", len(cands) - len(kept))
        return kept


PLUGIN = FreshMetrics
