"""pd: prefill/decode disaggregation, one decision naming two endpoints.

    lb_policy: pd
    lb_config:
      prefill: {lb_policy: cache_aware, lb_config: {}}   # FastDeploy's defaults
      decode: {lb_policy: request_num}

A route declares two pools, each with its own policy and ``lb_config`` (any endpoint policy
of the catalog: the pools are composed from the existing policies, never re-implemented).
The route's endpoints are split by role (``endpoints.roles`` in the config, the role an
instance registered with, or a pod's ``llm-d.ai/role`` label; an endpoint that declared
none counts as ``mixed``): by default the prefill pool takes ``prefill`` endpoints and the
decode pool ``decode`` and ``mixed`` ones (``roles`` per pool changes that).

The decode pool decides first: its pick is the destination (Envoy routes there; in front of
each decode server runs ``ai-lb pd-sidecar``). When that is a ``decode`` endpoint, the
prefill pool picks the server that computes the prompt, named in the
``x-prefiller-host-port`` request header (llm-d's convention), which only ai-lb sets; a
``mixed`` destination computes its prompt itself. Both endpoints are counted in flight for the request's
whole life and released exactly once (``Pick.also``: the core's tickets). No prefill pick
(no prefill endpoint, the prefill policy had no opinion, or it chose the destination
itself) means no header: the decode server computes the prompt, as a mixed server does.
Each pool keeps its own state (its policy's notes, hooks and ``on_done``), and its events
are exported with a ``prefill_`` / ``decode_`` prefix next to the route's own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

from ..core import Decision, Endpoint, Fallback, Pick, Reject, Wait
from ..core.endpoint import ROLES
from .base import Policy, PolicyConfig, PolicyEnv

POLICY_NAME = "pd"
DEFAULT_FALLBACKS = 2  # server.fallback_endpoints' default, for routes that do not set their own


@dataclass(frozen=True)
class _Pool:
    """One pool of a PD route: its policy, that policy's ``lb_config``, the roles it serves."""

    POOL: ClassVar[str] = ""
    DEFAULT_POLICY: ClassVar[str] = ""
    DEFAULT_ROLES: ClassVar[tuple[str, ...]] = ()

    lb_policy: str = ""
    lb_config: Mapping[str, Any] = field(default_factory=dict)
    roles: tuple[str, ...] = ()

    @classmethod
    def default(cls) -> "_Pool":
        return cls(cls.DEFAULT_POLICY, {}, cls.DEFAULT_ROLES)

    @classmethod
    def __config_parse__(cls, v: Any, path: str, raw: Any) -> "_Pool | None":
        from . import registry  # the catalog (it imports this module)

        if not isinstance(raw, Mapping):
            v.err(path, "expected a mapping with lb_policy, lb_config and roles")
            return None
        n0 = len(v.problems)
        v.unknown_keys(path, raw, {"lb_policy", "lb_config", "roles"})
        policy = raw.get("lb_policy", cls.DEFAULT_POLICY)
        allowed = [n for n in registry.names("endpoint") if registry.get(n) is not PrefillDecode]
        if policy not in allowed:
            v.err(f"{path}.lb_policy", f"unknown policy {policy!r} for the {cls.POOL} pool; allowed: {', '.join(allowed)}")
        lb_config = raw.get("lb_config") or {}
        if not isinstance(lb_config, Mapping):
            v.err(f"{path}.lb_config", "expected a mapping (the pool's policy settings)")
        elif policy in allowed:
            parsed, bad = v.dataclass_partial(f"{path}.lb_config", lb_config, registry.config_class(policy))
            v.validate_partial(f"{path}.lb_config", parsed, bad)
        roles = raw.get("roles", list(cls.DEFAULT_ROLES))
        if not isinstance(roles, list) or not roles or any(r not in ROLES for r in roles):
            v.err(f"{path}.roles", f"expected a non-empty list of roles from {', '.join(ROLES)}, got {roles!r}")
        if len(v.problems) > n0:
            return None
        return cls(policy, dict(lb_config), tuple(roles))


@dataclass(frozen=True)
class PrefillPool(_Pool):
    POOL = "prefill"
    DEFAULT_POLICY = "cache_aware"   # FastDeploy's prefill-policy default in its docs' config
    DEFAULT_ROLES = ("prefill",)


@dataclass(frozen=True)
class DecodePool(_Pool):
    POOL = "decode"
    DEFAULT_POLICY = "request_num"   # FastDeploy's decode default
    DEFAULT_ROLES = ("decode", "mixed")


@dataclass(frozen=True)
class PdConfig(PolicyConfig):
    prefill: PrefillPool = field(default_factory=PrefillPool.default)
    decode: DecodePool = field(default_factory=DecodePool.default)


class _Legs:
    """A PD request's two picks and each pool policy's own per-request state."""

    __slots__ = ("decode", "decode_state", "prefill", "prefill_state")

    def __init__(self, decode: Endpoint, decode_state: Any) -> None:
        self.decode, self.decode_state = decode, decode_state
        self.prefill: Endpoint | None = None
        self.prefill_state: Any = None


def _pool_policy(spec: _Pool, env: PolicyEnv, pool: str) -> Policy:
    from ..config import policy_config
    from . import registry

    cls = registry.get(spec.lb_policy)
    route = dataclasses.replace(env.route, name=f"{env.route.name}/{pool}", lb_policy=spec.lb_policy,
                                lb_config=dict(spec.lb_config))  # its own state namespace (route.pool)
    return cls(policy_config(cls.Config, spec.lb_config), dataclasses.replace(env, route=route))


def _endpoint(d: Any) -> Endpoint | None:
    d = d.endpoint if isinstance(d, Pick) else d
    return d if isinstance(d, Endpoint) else None


class PrefillDecode(Policy):
    name = POLICY_NAME
    Config = PdConfig
    uses_roles = True

    def __init__(self, config: PdConfig, env: PolicyEnv) -> None:
        self._own: dict[str, int] = {}
        super().__init__(config, env)
        self.prefill = _pool_policy(config.prefill, env, "prefill")
        self.decode = _pool_policy(config.decode, env, "decode")
        legs = (self.prefill, self.decode)
        self.needs_body = any(p.needs_body for p in legs)
        self.needs_response_headers = self.decode.needs_response_headers   # only the destination answers
        self.needs_response_body = any(p.needs_response_body for p in legs)
        self.first_token_sample = max(p.first_token_sample for p in legs)
        self.roles = (frozenset(config.prefill.roles), frozenset(config.decode.roles))
        n = env.route.fallback_endpoints
        self.max_fallbacks = DEFAULT_FALLBACKS if n is None else n

    # The route's events, then each pool's with its prefix (ai_lb_policy_events_total).
    @property
    def stats(self) -> dict[str, int]:
        out = dict(self._own)
        for prefix, p in (("prefill_", self.prefill), ("decode_", self.decode)):
            out.update({prefix + k: v for k, v in dict(p.stats).items()})
        return out

    @stats.setter
    def stats(self, value: dict[str, int]) -> None:
        self._own = value

    def _count(self, event: str) -> None:
        self._own[event] = self._own.get(event, 0) + 1

    def split(self, candidates: Sequence[Endpoint]) -> tuple[list[Endpoint], list[Endpoint]]:
        pre_roles, dec_roles = self.roles
        pre = [e for e in candidates if (e.role or "mixed") in pre_roles]
        dec = [e for e in candidates if (e.role or "mixed") in dec_roles]
        return pre, dec

    # -- the decision ---------------------------------------------------------------------
    async def pick(self, ctx, candidates: Sequence[Endpoint]) -> Decision:
        pre, dec = self.split(candidates)
        if not dec:
            self._count("no_decode_endpoint")
            return Fallback("no_decode_endpoint")
        d = await self.decode.pick(ctx, dec)
        if isinstance(d, Wait):  # the decode pool holds the request: so does the route
            return Wait(self._with_prefill(ctx, pre, dec, d.ready), d.max_wait)
        return await self._with_prefill(ctx, pre, dec, d)

    async def _with_prefill(self, ctx, pre: list[Endpoint], dec: list[Endpoint], d: Any) -> Decision:
        if not isinstance(d, (Endpoint, Pick, Reject, Fallback)):
            d = await d  # a held decision, now due
        dest = _endpoint(d)
        if dest is None:
            return d  # the decode pool's own answer: a fallback or a rejection
        legs = _Legs(dest, ctx.policy_state)
        ctx.policy_state = None
        if dest.role != "decode":
            self._count("mixed_destination")  # a mixed server computes its prompts itself
        elif not pre:
            self._count("no_prefill_endpoint")
        else:
            p = await self.prefill.pick(ctx, pre)
            if isinstance(p, Wait):
                p = await p.ready
            pe = _endpoint(p)
            if pe is not None:
                legs.prefill, legs.prefill_state = pe, ctx.policy_state
                if pe.address == dest.address:  # a mixed endpoint in both pools: it prefills itself
                    self._leg(ctx, legs, True, "on_done")
                    legs.prefill = None
                    self._count("prefill_local")
            elif isinstance(p, Reject):
                ctx.policy_state = legs
                self._leg(ctx, legs, False, "on_done")  # the decode pick is given back
                ctx.policy_state = None
                return p
            else:
                self._count("prefill_fallback")
        ctx.policy_state = legs
        if legs.prefill is not None:
            self._count("disaggregated")
        named = d.fallbacks if isinstance(d, Pick) else ()
        if len(named) < self.max_fallbacks:  # retries stay in the decode pool
            load = self.env.load.requests
            rest = sorted((e for e in dec if e.address != dest.address and e not in named),
                          key=lambda e: (load(e.address), e.address))
            named = (*named, *rest[:self.max_fallbacks - len(named)])
        also = (("prefill", legs.prefill),) if legs.prefill is not None else ()
        return Pick(dest, also=also, fallbacks=tuple(named))

    # -- each pool's hooks, with its own state -----------------------------------------------
    def _leg(self, ctx, legs: _Legs, prefill: bool, hook: str, *args: Any) -> None:
        pol, ep = (self.prefill, legs.prefill) if prefill else (self.decode, legs.decode)
        if ep is None:
            return
        saved = ctx.endpoint
        ctx.policy_state, ctx.endpoint = (legs.prefill_state if prefill else legs.decode_state), ep
        try:
            getattr(pol, hook)(ctx, *args)
        finally:
            if prefill:
                legs.prefill_state = ctx.policy_state
            else:
                legs.decode_state = ctx.policy_state
            ctx.policy_state, ctx.endpoint = legs, saved

    def _both(self, ctx, hook: str, *args: Any) -> None:
        legs = ctx.policy_state
        if not isinstance(legs, _Legs):
            return
        try:
            self._leg(ctx, legs, True, hook, *args)
        finally:
            self._leg(ctx, legs, False, hook, *args)

    def on_candidates(self, candidates: Sequence[Endpoint]) -> None:
        pre, dec = self.split(candidates)
        self.prefill.on_candidates(pre)
        self.decode.on_candidates(dec)

    def on_response_headers(self, ctx, status: int) -> None:
        legs = ctx.policy_state
        if isinstance(legs, _Legs):  # the status is the destination's (the decode server's)
            self._leg(ctx, legs, False, "on_response_headers", status)

    def on_response_body(self, ctx, chunk: bytes, end_of_stream: bool) -> None:
        self._both(ctx, "on_response_body", chunk, end_of_stream)

    def on_first_token(self, ctx, ttft: float) -> None:
        self._both(ctx, "on_first_token", ttft)

    def on_done(self, ctx) -> None:
        self._both(ctx, "on_done")

    async def start(self) -> None:
        await self.prefill.start()
        await self.decode.start()

    async def close(self) -> None:
        try:
            await self.prefill.close()
        finally:
            await self.decode.close()


POLICY = PrefillDecode
