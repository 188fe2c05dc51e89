"""What a policy decides for one request.

An ``Endpoint`` (route there), a ``ClusterPick`` (``lb_type: cluster``), a ``Reject`` (an
HTTP error such as 429), or a ``Fallback`` (no opinion: Envoy's own load balancing).
"""

from __future__ import annotations

from dataclasses import dataclass

from .endpoint import Endpoint


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse the request with an HTTP status (e.g. 429 when every endpoint is at its cap)."""

    status: int
    message: str


@dataclass(frozen=True, slots=True)
class Fallback:
    """No opinion: let Envoy's native load balancing choose, counted under ``reason``."""

    reason: str


@dataclass(frozen=True, slots=True)
class ClusterPick:
    """``lb_type: cluster``: send the request to another Envoy cluster by rewriting the
    route's ``cluster_header`` (Envoy re-evaluates the route)."""

    cluster: str
    header: str


Decision = Endpoint | ClusterPick | Reject | Fallback
