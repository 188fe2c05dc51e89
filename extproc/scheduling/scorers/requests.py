"""requests: fewer requests in flight scores higher.

``source: local`` (default) counts this process's own requests in flight on each
endpoint (FastDeploy's ``request_num``: in-memory counting, exact for its own traffic);
``source: estimated`` uses the engine's running + waiting from the last fresh scrape,
corrected for this process's picks and completions since (assumed load), falling back to
the local count without metrics. Min-max normalised: 1 for the least loaded, 0 for the
most.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..framework import Candidate, Scorer, Snapshot, inverse_minmax


@dataclass(frozen=True)
class RequestsConfig:
    source: Literal["local", "estimated"] = "local"


class Requests(Scorer):
    name = "requests"
    Config = RequestsConfig

    def __init__(self, config: RequestsConfig | None = None, weight: float = 1.0) -> None:
        super().__init__(config or RequestsConfig(), weight)
        self.uses_metrics = self.config.source == "estimated"

    def score(self, snap: Snapshot, cands: list[Candidate]) -> list[float]:
        if self.config.source == "local":
            return inverse_minmax([c.load.requests for c in cands])
        return inverse_minmax([c.total for c in cands])


PLUGIN = Requests
