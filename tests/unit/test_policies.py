import asyncio
from collections import Counter

from extproc.config import RouteConfig
from extproc.context import RequestContext
from extproc.endpoints import Endpoint
from extproc.policies import PolicyEnv, registry
from extproc.policies.base import NoConfig
from extproc.state import MemoryInflight

EPS = [Endpoint("10.0.0.1:1"), Endpoint("10.0.0.2:1"), Endpoint("10.0.0.3:1")]


def make(name, inflight=None):
    cls = registry.get(name)
    env = PolicyEnv(route=RouteConfig(name="r", lb_policy=name), inflight=inflight or MemoryInflight())
    return cls(NoConfig(), env)


def picks(policy, n, eps=EPS):
    async def go():
        return [await policy.pick(RequestContext("r", {}), eps) for _ in range(n)]
    return asyncio.run(go())


def test_registry_has_the_builtins():
    assert {"round_robin", "random", "least_request", "global_least_request"} <= set(registry.names("endpoint"))
    assert "cluster_metrics" in registry.names("cluster")
    assert "round_robin" not in registry.names("cluster")


def test_round_robin_cycles_in_order():
    got = picks(make("round_robin"), 6)
    assert [e.address for e in got] == [e.address for e in EPS] * 2


def test_round_robin_survives_shrinking_candidate_list():
    p = make("round_robin")
    picks(p, 2)
    assert picks(p, 2, EPS[:1]) == [EPS[0], EPS[0]]


def test_random_covers_all_endpoints():
    c = Counter(e.address for e in picks(make("random"), 300))
    assert set(c) == {e.address for e in EPS}
    assert min(c.values()) > 50


def test_least_request_picks_fewest_in_flight():
    infl = MemoryInflight()
    for _ in range(3):
        infl.inc(EPS[0].address)
    infl.inc(EPS[1].address)
    infl.inc(EPS[2].address)
    infl.inc(EPS[2].address)
    assert {e.address for e in picks(make("least_request", infl), 20)} == {EPS[1].address}


def test_least_request_breaks_ties_at_random():
    c = Counter(e.address for e in picks(make("least_request"), 300))
    assert len(c) == 3 and min(c.values()) > 50


def test_memory_inflight_never_negative():
    infl = MemoryInflight()
    infl.dec("a")
    assert infl.get("a") == 0
    infl.inc("a")
    assert infl.get("a") == 1
