"""What the gateway core does around a policy, for tests that drive a policy directly:
every routed request is counted in the load view once when picked and released once when
done (``envoy.processor`` does exactly this)."""

from __future__ import annotations

from extproc.config import EndpointsConfig, RouteConfig
from extproc.core import Endpoint, Pick
from extproc.policies import PolicyEnv


def env(policy: str = "round_robin", route: str = "r", store: str = "memory", cluster: str | None = None,
        static: tuple[str, ...] = ()) -> PolicyEnv:
    rc = RouteConfig(name=route, lb_policy=policy, endpoints=EndpointsConfig(static=tuple(static), cluster=cluster))
    return PolicyEnv.standalone(rc, store_url=store)


async def route(policy, ctx, candidates):
    """``policy.pick`` plus the core's accounting of a pick."""
    d = await policy.pick(ctx, candidates)
    ep, also = (d.endpoint, d.also) if isinstance(d, Pick) else (d, ())
    if isinstance(ep, Endpoint):
        ctx.endpoint = ep
        ctx.policy = policy
        begin = policy.env.load.begin
        ctx.tickets = (begin(ep.address, ctx.prompt_tokens), *(begin(e.address, ctx.prompt_tokens) for _, e in also))
    return d


def done(policy, ctx, status: int | None = None) -> None:
    """The core's end of a request: released once (with the upstream status, if any),
    then the policy's hook."""
    if ctx.tickets:
        policy.env.load.end(ctx.tickets[0], status if status is not None else ctx.status)
        for t in ctx.tickets[1:]:
            policy.env.load.end(t)
    policy.on_done(ctx)
