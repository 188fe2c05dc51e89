"""What the gateway core does around a policy, for tests that drive a policy directly:
every routed request is counted in the load view once when picked and released once when
done (``envoy.processor`` does exactly this)."""

from __future__ import annotations

from extproc.config import EndpointsConfig, RouteConfig
from extproc.core import Endpoint
from extproc.policies import PolicyEnv


def env(policy: str = "round_robin", route: str = "r", store: str = "memory", cluster: str | None = None,
        static: tuple[str, ...] = ()) -> PolicyEnv:
    rc = RouteConfig(name=route, lb_policy=policy, endpoints=EndpointsConfig(static=tuple(static), cluster=cluster))
    return PolicyEnv.standalone(rc, store_url=store)


async def route(policy, ctx, candidates):
    """``policy.pick`` plus the core's accounting of a pick."""
    d = await policy.pick(ctx, candidates)
    if isinstance(d, Endpoint):
        ctx.endpoint = d
        ctx.policy = policy
        policy.env.load.begin(d.address)
    return d


def done(policy, ctx) -> None:
    """The core's end of a request: released once, then the policy's hook."""
    if ctx.endpoint is not None:
        policy.env.load.end(ctx.endpoint.address)
    policy.on_done(ctx)
