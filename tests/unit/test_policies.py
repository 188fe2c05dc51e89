import asyncio
from collections import Counter

import pytest

from core_sim import env
from extproc.core import Endpoint, RequestContext
from extproc.policies import Policy, registry
from extproc.policies.registry import DuplicatePolicy
from extproc.state import LocalInflight

EPS = [Endpoint("10.0.0.1:1"), Endpoint("10.0.0.2:1"), Endpoint("10.0.0.3:1")]


def make(name, busy=None):
    """The policy with ``busy`` = {address: requests already in flight}, counted by the core."""
    cls = registry.get(name)
    e = env(name)
    for addr, n in (busy or {}).items():
        for _ in range(n):
            e.load.begin(addr)
    return cls(cls.Config(), e)


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
    busy = {EPS[0].address: 3, EPS[1].address: 1, EPS[2].address: 2}
    assert {e.address for e in picks(make("least_request", busy), 20)} == {EPS[1].address}


def test_least_request_breaks_ties_at_random():
    c = Counter(e.address for e in picks(make("least_request"), 300))
    assert len(c) == 3 and min(c.values()) > 50


def test_local_inflight_never_negative():
    infl = LocalInflight()
    infl.dec("a")
    assert infl.get("a") == 0
    infl.inc("a")
    assert infl.get("a") == 1


def test_registry_rejects_a_second_policy_under_a_taken_name():
    class Impostor(Policy):
        name = "round_robin"

    with pytest.raises(DuplicatePolicy, match="round_robin"):
        registry.register(Impostor)
    assert registry.get("round_robin").__name__ == "RoundRobin"
    registry.register(registry.get("round_robin"))  # the same class again: harmless


def test_registry_requires_a_config_with_validate():
    class NoValidate(Policy):
        name = "test_no_validate"
        Config = dict

    with pytest.raises(TypeError, match="validate"):
        registry.register(NoValidate)
    assert "test_no_validate" not in registry.names()


def test_every_builtin_policy_lives_in_a_module_named_like_it():
    for name in registry.BUILTIN:
        cls = registry.get(name)
        assert cls.name == name and cls.__module__ == f"extproc.policies.{name}"
