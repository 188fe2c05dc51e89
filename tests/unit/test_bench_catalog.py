"""The bench's system catalog: every registered policy is in the default run or excluded
with a reason; specs carry lb_config inline or from --ai-lb-config."""

import pytest

from aibench.systems import catalog
from extproc.policies import registry


def test_every_registered_policy_is_benched_or_excluded_with_a_reason():
    known = {p for p, _ in catalog.AI_LB_POLICIES} | set(catalog.AI_LB_NOT_DEFAULT)
    builtin = {n for n in registry.names() if registry.get(n).__module__.startswith("extproc.policies.")}
    missing = builtin - known  # (other tests register plugin policies too: not ours to bench)
    assert not missing, f"add {sorted(missing)} to aibench/systems/catalog.py (AI_LB_POLICIES or AI_LB_NOT_DEFAULT)"
    assert not {p for p, _ in catalog.AI_LB_POLICIES} - builtin, "a benched policy is not registered"


def test_default_systems():
    d = catalog.default_systems()
    assert d[:2] == ["envoy-rr", "envoy-lr"] and d[-3:] == ["sglang-router", "vllm-router", "oracle"]
    for p in ("round_robin", "least_request", "request_num", "power_of_two", "process_tokens", "fd_metrics_score",
              "least_kv_cache", "endpoint_metrics", "global_least_request", "prefix_cache"):
        assert f"ai-lb:{p}" in d
    assert len(d) == len(set(d))


def test_specs_and_lb_config(tmp_path):
    specs = catalog.split_specs('envoy-rr, ai-lb:fd_metrics_score{"waiting-weight":5,"x":[1,2]},oracle,')
    assert specs == ["envoy-rr", 'ai-lb:fd_metrics_score{"waiting-weight":5,"x":[1,2]}', "oracle"]
    assert catalog.parse_ai_lb(specs[1]) == ("fd_metrics_score", {"waiting-weight": 5, "x": [1, 2]})
    assert catalog.parse_ai_lb("ai-lb:round_robin") == ("round_robin", None)
    with pytest.raises(ValueError, match="not JSON"):
        catalog.parse_ai_lb("ai-lb:x{nope}")
    f = tmp_path / "cfg.yaml"
    f.write_text("endpoint_metrics: {rate_limit: 0.5}\nfd_metrics_score: {waiting-weight: 3}\n")
    over = catalog.load_ai_lb_config(f)
    assert catalog.ai_lb_config("endpoint_metrics", None, over) == {"metric_policy": "default", "rate_limit": 0.5}
    assert catalog.ai_lb_config("fd_metrics_score", {"waiting-weight": 9}, over) == {"waiting-weight": 9}
    s = catalog.make_system('ai-lb:fd_metrics_score{"waiting-weight":5}', overrides=over)
    assert s.policy == "fd_metrics_score" and s.lb_config == {"waiting-weight": 5}
    q = catalog.make_system('ai-lb:least_request{"queue":{"saturation":{"max_inflight":8}}}')
    assert q.lb_config == {} and q.queue == {"saturation": {"max_inflight": 8}}   # the route's queue, not lb_config
    assert q.name == "ai-lb-least-request-queue" != catalog.make_system("ai-lb:least_request").name
    f.write_text("- just a list\n")
    with pytest.raises(ValueError, match="mapping"):
        catalog.load_ai_lb_config(f)
    with pytest.raises(ValueError, match="unknown system"):
        catalog.make_system("haproxy")


def test_the_pd_system_spec_and_its_fleet():
    assert "ai-lb-pd[:P]" not in catalog.default_systems()  # needs a fleet split by role: asked for by name
    assert catalog.fleet_roles("ai-lb:request_num", 8) is None
    assert catalog.fleet_roles("ai-lb-pd", 8) == ["prefill"] * 2 + ["decode"] * 6  # a quarter prefill
    assert catalog.fleet_roles('ai-lb-pd:3{"decode":{"lb_policy":"power_of_two"}}', 8) == ["prefill"] * 3 + ["decode"] * 5
    s = catalog.make_system('ai-lb-pd:3{"decode":{"lb_policy":"power_of_two"}}',
                            overrides={"pd": {"prefill": {"lb_policy": "process_tokens"}}})
    assert s.policy == "pd" and s.lb_config == {"prefill": {"lb_policy": "process_tokens"},
                                                "decode": {"lb_policy": "power_of_two"}}
    for bad in ("ai-lb-pd:0", "ai-lb-pd:x", "ai-lb-pdx", "ai-lb-pd{nope}"):
        with pytest.raises(ValueError):
            catalog.fleet_roles(bad, 8)
    with pytest.raises(ValueError, match="no decode server"):
        catalog.fleet_roles("ai-lb-pd:8", 8)
