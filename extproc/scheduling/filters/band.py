"""band: keep the lowest (or highest) band of a metric, Higress/early-GIE style.

The band is ``[min, min + (max - min) / N]`` over the N candidates that export the
metric (``[max - (max - min) / N, max]`` for ``highest``). ``metric`` is any scraped
metric name; the queue, running and KV names are read with assumed load added. Endpoints
without the metric are left out while some have it; if none has it the filter keeps all.
Either way the decision counts ``missing:<metric>``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..framework import Candidate, Filter, Snapshot


@dataclass(frozen=True)
class BandConfig:
    metric: str
    highest: bool = False

    def validate(self) -> list[tuple[str, str]]:
        return [] if self.metric else [("metric", "must name a metric")]


def band(cands: list[Candidate], metric: str, highest: bool = False) -> tuple[list[Candidate], int]:
    """The band, and how many candidates lacked the metric."""
    have, vals = [], []
    for c in cands:
        v = c.metric(metric)
        if v is not None:
            have.append(c)
            vals.append(v)
    if not have:
        return cands, len(cands)
    lo, hi = min(vals), max(vals)
    width = (hi - lo) / len(cands)
    if highest:
        bottom = hi - width
        return [c for c, v in zip(have, vals) if v >= bottom], len(cands) - len(have)
    top = lo + width
    return [c for c, v in zip(have, vals) if v <= top], len(cands) - len(have)


class Band(Filter):
    name = "band"
    uses_metrics = True
    Config = BandConfig

    def filter(self, snap: Snapshot, cands: list[Candidate]) -> list[Candidate]:
        kept, missing = band(cands, self.config.metric, self.config.highest)
        if missing:
            snap.count(f"missing:{self.config.metric}")
        return kept


PLUGIN = Band
