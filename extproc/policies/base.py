"""The policy interface every load-balancing policy implements.

A policy answers one question, ``pick``, and may observe the request's life through
hooks. The gateway core does everything else (Envoy protocol, body buffering, fallbacks,
metrics), so a new policy is one module with one class plus a line in the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from ..endpoints import Endpoint

if TYPE_CHECKING:
    from ..config import RouteConfig
    from ..context import RequestContext
    from ..state import InflightCounter


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


@dataclass(frozen=True)
class NoConfig:
    """``lb_config`` of a policy that takes no settings: any field is an error."""


@dataclass
class PolicyEnv:
    """What the core lends a policy: the route it serves and shared state."""

    route: "RouteConfig"
    inflight: "InflightCounter"
    store_url: str = "memory"


class Policy:
    """Base class with no-op hooks; subclasses set ``name`` and implement ``pick``.

    ``needs_body``: the JSON body must be read before ``pick`` (costs a buffered body round
    trip in Envoy, so only policies that look at the prompt set it).
    ``needs_response_headers`` / ``needs_response_body``: ask Envoy to send those so the
    hooks below fire; each costs a round trip per request or per chunk.
    ``on_done`` fires exactly once for every request this policy routed (Endpoint or ClusterPick),
    however the request ended. ``ctx.outcome`` is complete, error, reset or unobserved
    (precise only when the policy asked for response headers: see processor._outcome).
    """

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    lb_type: ClassVar[str] = "endpoint"
    Config: ClassVar[type] = NoConfig  # a dataclass; field names are the lb_config keys

    needs_body: bool = False
    needs_response_headers: bool = False
    needs_response_body: bool = False

    def __init__(self, config: Any, env: PolicyEnv) -> None:
        self.config = config
        self.env = env
        # Event counts worth watching (prefix hits, stale metrics, ...): exported as
        # ai_lb_policy_events_total{route,policy,event}.
        self.stats: dict[str, int] = {}

    async def pick(self, ctx: "RequestContext", candidates: Sequence[Endpoint]) -> Decision:
        """Choose for one request. ``candidates`` are the route's healthy endpoints
        (empty for ``lb_type: cluster`` policies, which choose among clusters)."""
        raise NotImplementedError

    def on_response_headers(self, ctx: "RequestContext", status: int) -> None:
        pass

    def on_response_body(self, ctx: "RequestContext", chunk: bytes, end_of_stream: bool) -> None:
        pass

    def on_done(self, ctx: "RequestContext") -> None:
        pass

    async def start(self) -> None:
        """Called once before the first pick (open connections, start scrapers)."""

    async def close(self) -> None:
        """Called when a reload replaces this policy and its last request has finished."""
