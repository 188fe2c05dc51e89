"""Candidate endpoints per route, resolved from the route's ``endpoints`` config.

Static lists resolve by themselves; ``cluster`` names are filled by a discovery source
(``extproc.discovery``). ``version`` changes whenever discovery does, so routes cache
their candidates per version (``RouteRuntime.candidates``) and resolve once per change,
not per request.
"""

from __future__ import annotations

from ..config import EndpointsConfig
from .endpoint import Endpoint


class EndpointDirectory:
    """Resolves a route's endpoint config to its healthy candidates."""

    def __init__(self) -> None:
        self._clusters: dict[str, tuple[Endpoint, ...]] = {}
        self.discovered_once = False
        self.version = 0  # bumped on every change, so callers can cache per version

    def update_clusters(self, clusters: dict[str, tuple[Endpoint, ...]]) -> bool:
        self.discovered_once = True
        if clusters == self._clusters:
            return False
        self._clusters = clusters
        self.version += 1
        return True

    def candidates(self, cfg: EndpointsConfig) -> tuple[Endpoint, ...]:
        return tuple(e for e in self.all_known(cfg) if e.healthy)

    def all_known(self, cfg: EndpointsConfig) -> tuple[Endpoint, ...]:
        """Every endpoint of the route, healthy or not (for status pages and metrics)."""
        if cfg.cluster is None:
            return tuple(Endpoint(a) for a in cfg.static)
        eps = self._clusters.get(cfg.cluster, ())
        if cfg.static:
            allowed = set(cfg.static)
            eps = tuple(e for e in eps if e.address in allowed)
        return eps
