"""pick_share: leave out endpoints that got more than ``limit`` of the recent picks.

Higress's ``rate_limit``, over a time window (``window`` seconds, default 10) instead of
"the last 100 picks". The window belongs to the filter instance (one per route), and the
filter records every pick of its policy. ``limit`` 1 switches it off.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...signals.pick_share import PickShare
from ..framework import Candidate, Filter, Snapshot


@dataclass(frozen=True)
class PickShareConfig:
    limit: float = 1.0
    window: float = 10.0

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if not 0 < self.limit <= 1:
            out.append(("limit", f"must be in (0, 1], got {self.limit}"))
        if self.window <= 0:
            out.append(("window", "must be > 0 seconds"))
        return out


class PickShareFilter(Filter):
    name = "pick_share"
    Config = PickShareConfig

    def __init__(self, config: PickShareConfig) -> None:
        super().__init__(config)
        self.share = PickShare(config.window)

    def filter(self, snap: Snapshot, cands: list[Candidate]) -> list[Candidate]:
        over = self.share.over(self.config.limit, snap.now)
        return [c for c in cands if c.address not in over] if over else cands

    def picked(self, snap: Snapshot, chosen: Candidate) -> None:
        if self.config.limit < 1:
            self.share.record(chosen.address, snap.now)


PLUGIN = PickShareFilter
