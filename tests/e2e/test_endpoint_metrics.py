"""endpoint_metrics through the real Envoy: picks follow the simulators' /metrics.

Backend 0 is made busy by requests sent to it directly (not through the gateway) while a
slowdown fault keeps them running; requests through the gateway must then avoid it.
"""

from __future__ import annotations

import time

import pytest

import harness as h

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"


post_json, sim_state, Busy = h.post_json, h.sim_state, h.Busy


def route(lb_config: dict) -> dict:
    return {"llm": {"lb_policy": "metrics_based", "lb_config": lb_config, "endpoints": {"cluster": "llm_backends"}}}


def warm_up(gw) -> None:
    """The first request teaches the policy the route's endpoints; give it a few scrapes."""
    h.load(gw.url + CHAT, n=3, concurrency=1)
    time.sleep(0.4)


def test_least_running_avoids_the_busy_backend(gw):
    gw.ai_lb(route({"metric_policy": "least", "target_metric": "vllm:num_requests_running"}))
    warm_up(gw)
    busy = str(gw.backends[0])
    with Busy(gw.backends[0]):
        time.sleep(0.3)  # a scrape or two sees it
        res = h.load(gw.url + CHAT, n=30, concurrency=3)
        assert res.failed == 0, res.errors[:3]
        assert busy not in res.served_by, dict(res.served_by)
        assert sum(res.served_by.values()) == 30
        # The same traffic under native round robin does hit the busy backend (the test can fail).
        ctl = h.load(gw.url + "/native" + CHAT, n=9, concurrency=1)
        assert ctl.served_by[busy] == 3
    m = gw.metrics()
    assert h.metric_value(m, "ai_lb_decisions_total", route="llm", outcome="picked") >= 30


def test_default_chain_avoids_the_loaded_backend(gw):
    gw.ai_lb(route({"metric_policy": "default", "rate_limit": "1"}))
    warm_up(gw)
    busy = str(gw.backends[0])
    # Long prompts: the busy backend's KV usage rises well above the idle ones'.
    with Busy(gw.backends[0], prompt_words=4000):
        time.sleep(0.3)
        st = sim_state(gw.backends[0])
        assert st["kv_cache_usage"] > 0.01, st  # idle backends: ~0
        res = h.load(gw.url + CHAT, n=30, concurrency=3)
        assert res.failed == 0, res.errors[:3]
        assert busy not in res.served_by, dict(res.served_by)


def test_unreachable_metrics_do_not_break_routing(gw):
    # Every scrape fails (404): nothing is known, every request goes to Envoy's own LB.
    gw.ai_lb(route({"metric_policy": "least", "target_metric": "vllm:num_requests_waiting",
                    "metrics_path": "/no-such-metrics"}))
    warm_up(gw)
    res = h.load(gw.url + CHAT, n=12, concurrency=2)
    assert res.failed == 0, res.errors[:3]
    assert len(res.served_by) == 3
    m = gw.metrics()
    assert h.metric_value(m, "ai_lb_fallbacks_total", route="llm", reason="metrics_unavailable") == 15
    assert h.metric_value(m, "ai_lb_policy_events_total", route="llm", policy="metrics_based",
                          event="metrics_unavailable") == 15
