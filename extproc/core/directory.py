"""Candidate endpoints per route, resolved from the route's ``endpoints`` config.

Static lists resolve by themselves; discovered sets (an Envoy cluster, a Kubernetes
InferencePool, Service or selector) are filled by the discovery sources
(``extproc.discovery``), each replacing only its own sets. ``version`` changes whenever discovery does, so routes cache
their candidates per version (``RouteRuntime.candidates``) and resolve once per change,
not per request.
"""

from __future__ import annotations

from dataclasses import replace

from ..config import EndpointsConfig
from .endpoint import Endpoint


class EndpointDirectory:
    """Resolves a route's endpoint config to its healthy candidates."""

    def __init__(self) -> None:
        self._by_source: dict[str, dict[str, tuple[Endpoint, ...]]] = {}
        self._clusters: dict[str, tuple[Endpoint, ...]] = {}
        self.discovered_once = False
        self.version = 0  # bumped on every change, so callers can cache per version

    def update_clusters(self, clusters: dict[str, tuple[Endpoint, ...]], source: str = "envoy") -> bool:
        """Replace everything ``source`` reported before with ``clusters``; True if changed."""
        self.discovered_once = True
        if self._by_source.get(source) == clusters:
            return False
        self._by_source[source] = clusters
        merged: dict[str, tuple[Endpoint, ...]] = {}
        for sets in self._by_source.values():
            merged.update(sets)
        self._clusters = merged
        self.version += 1
        return True

    def candidates(self, cfg: EndpointsConfig) -> tuple[Endpoint, ...]:
        return tuple(e for e in self.all_known(cfg) if e.healthy)

    def all_known(self, cfg: EndpointsConfig) -> tuple[Endpoint, ...]:
        """Every endpoint of the route, healthy or not (for status pages and metrics)."""
        name = cfg.source
        if name is None:
            eps = tuple(Endpoint(a) for a in cfg.static)
        else:
            eps = self._clusters.get(name, ())
            if cfg.static:
                allowed = set(cfg.static)
                eps = tuple(e for e in eps if e.address in allowed)
        return with_roles(eps, cfg.roles) if cfg.roles else eps


def with_roles(eps: tuple[Endpoint, ...], roles: tuple[tuple[str, str], ...]) -> tuple[Endpoint, ...]:
    """The config's roles over the sources' (the operator's word wins); a labelled address
    no source names joins as a static endpoint (healthy: nothing checks it)."""
    by = dict(roles)
    out = [replace(e, role=by[e.address]) if e.address in by and e.role != by[e.address] else e for e in eps]
    seen = {e.address for e in eps}
    out += [Endpoint(a, True, r) for a, r in roles if a not in seen]
    return tuple(out)
