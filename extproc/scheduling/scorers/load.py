"""load: a lighter load scores higher, relative to the heaviest candidate (FastDeploy's
``load / max_load`` term of cache_aware).

Load = running + waiting x ``waiting_weight`` (FastDeploy's ``waiting-weight``, default
10), read with assumed load from fresh scrapes, or this process's own in-flight count
without them. Score = 1 - load / max load over the candidates (1 for all when idle).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..framework import Candidate, Scorer, Snapshot
from .fd_metrics import fd_score


@dataclass(frozen=True)
class LoadConfig:
    waiting_weight: float = 10.0

    def validate(self) -> list[tuple[str, str]]:
        return [] if self.waiting_weight >= 0 else [("waiting_weight", "must be >= 0")]


class Load(Scorer):
    name = "load"
    Config = LoadConfig
    uses_metrics = True

    def __init__(self, config: LoadConfig | None = None, weight: float = 1.0) -> None:
        super().__init__(config or LoadConfig(), weight)

    def score(self, snap: Snapshot, cands: list[Candidate]) -> list[float]:
        w = self.config.waiting_weight
        loads = [fd_score(c, w) for c in cands]
        hi = max(loads)
        return [1.0] * len(loads) if hi <= 0 else [1.0 - x / hi for x in loads]


PLUGIN = Load
