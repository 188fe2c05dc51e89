"""What a policy decides for one request.

An ``Endpoint`` (route there), a ``Pick`` (an endpoint with more: other endpoints the
request also uses, such as its prefill server, and fallbacks for retries), a
``ClusterPick`` (``lb_type: cluster``), a ``Reject`` (an HTTP error such as 429), a
``Fallback`` (no opinion: Envoy's own load balancing), or a ``Wait`` (hold the request
until capacity frees, then decide).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable

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


@dataclass(frozen=True, slots=True)
class Pick:
    """Route to ``endpoint``; ``also`` names the other endpoints this request occupies by
    role (``(("prefill", ep),)`` for prefill/decode: each is counted in flight and released
    exactly once, like the destination); ``fallbacks`` are tried by Envoy on retry."""

    endpoint: Endpoint
    also: tuple[tuple[str, Endpoint], ...] = ()
    fallbacks: tuple[Endpoint, ...] = ()


@dataclass(frozen=True, slots=True)
class Wait:
    """Hold the request (the ext_proc stream stays open) until ``ready`` gives the real
    decision. The policy owns the deadline: ``ready`` resolves by ``max_wait`` seconds at
    the latest (to a ``Reject`` if nothing freed up), and the core extends Envoy's message
    timeout to cover it, so a held request never falls open by timing out."""

    ready: Awaitable["Decision"]
    max_wait: float


Decision = Endpoint | Pick | ClusterPick | Reject | Fallback | Wait
