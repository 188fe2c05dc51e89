"""The policy interface every load-balancing policy implements.

A policy answers one question, ``pick``, and may observe the request's life through
hooks. The gateway core does everything else (Envoy protocol, body buffering, fallbacks,
metrics, in-flight accounting), so a new policy is one module with one class, its typed
``lb_config`` dataclass, and a line in the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from ..core import Decision, Endpoint

if TYPE_CHECKING:
    from ..config import RouteConfig
    from ..core import RequestContext
    from ..signals import LoadView, ScraperService
    from ..state import StateStores


@dataclass(frozen=True)
class PolicyConfig:
    """Base of every policy's ``lb_config`` dataclass (field names are the lb_config keys).
    ``validate`` returns (field, message) pairs for cross-field checks; config loading
    reports them with their field paths, all in one pass."""

    def validate(self) -> list[tuple[str, str]]:
        return []


@dataclass(frozen=True)
class NoConfig(PolicyConfig):
    """``lb_config`` of a policy that takes no settings: any field is an error."""


@dataclass
class PolicyEnv:
    """What the core lends a policy: the route it serves and the gateway's shared signals
    and state (one of each per gateway; never module globals)."""

    route: "RouteConfig"
    load: "LoadView"
    stores: "StateStores"
    scrapes: "ScraperService"
    store_url: str = "memory"

    @classmethod
    def standalone(cls, route: "RouteConfig", store_url: str = "memory") -> "PolicyEnv":
        """An environment of its own, for a policy used outside a gateway (tests, tools)."""
        from ..signals import LoadView, ScraperService
        from ..state import StateStores

        load = LoadView()
        return cls(route=route, load=load, stores=StateStores(load.inflight),
                   scrapes=ScraperService(on_sample=load.on_scrape), store_url=store_url)


class Policy:
    """Base class with no-op hooks; subclasses set ``name`` and implement ``pick``.

    ``needs_body``: the JSON body must be read before ``pick`` (costs a buffered body round
    trip in Envoy, so only policies that look at the prompt set it).
    ``needs_response_headers`` / ``needs_response_body``: ask Envoy to send those so the
    hooks below fire; each costs a round trip per request or per chunk.
    ``status_only``: the response headers are wanted only for ``ctx.status`` (read in
    ``on_done``); when Envoy's access log reports the end, it brings the status, so they
    are not asked for (one round trip fewer).
    ``on_done`` fires exactly once for every request this policy routed (Endpoint or ClusterPick),
    however the request ended. ``ctx.outcome`` is complete, error, reset, expired (its
    completion never came: the lease ran out) or unobserved (precise only when the policy
    asked for response headers, or the access log reported the end).
    """

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    lb_type: ClassVar[str] = "endpoint"
    Config: ClassVar[type[PolicyConfig]] = NoConfig

    needs_body: bool = False
    needs_response_headers: bool = False
    needs_response_body: bool = False
    status_only: bool = False
    # Fraction of requests whose response the core watches to its first token, calling
    # ``on_first_token`` (costs one ext_proc message per response chunk until then).
    first_token_sample: float = 0.0
    # Whether the policy reads ``Endpoint.role``: other policies are never offered a
    # prefill-only endpoint (it is not a destination); the ``pd`` policy sees them all.
    uses_roles: ClassVar[bool] = False

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

    def on_candidates(self, candidates: Sequence[Endpoint]) -> None:
        """The route's healthy endpoints changed (discovery); called before the first pick
        and on every change, with or without traffic."""

    def on_response_headers(self, ctx: "RequestContext", status: int) -> None:
        pass

    def on_response_body(self, ctx: "RequestContext", chunk: bytes, end_of_stream: bool) -> None:
        pass

    def on_first_token(self, ctx: "RequestContext", ttft: float) -> None:
        """A watched response (``first_token_sample``) produced its first token ``ttft``
        seconds after the request reached ai-lb."""

    def on_done(self, ctx: "RequestContext") -> None:
        pass

    async def start(self) -> None:
        """Called once before the first pick (open connections, start scrapers)."""

    async def close(self) -> None:
        """Called when a reload replaces this policy and its last request has finished."""
