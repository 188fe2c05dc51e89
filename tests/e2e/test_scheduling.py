"""The scheduling framework's named policies through the real Envoy and simulators."""

from __future__ import annotations

import time

import pytest

import harness as h

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"


def route(policy: str, lb_config: dict | None = None) -> dict:
    return {"llm": {"lb_policy": policy, "lb_config": lb_config or {}, "endpoints": {"cluster": "llm_backends"}}}


def picked(gw, policy: str) -> float:
    return h.metric_value(gw.metrics(), "ai_lb_decisions_total", route="llm", policy=policy, outcome="picked")


@pytest.mark.parametrize("policy,lb", [
    ("request_num", {}), ("power_of_two", {}), ("process_tokens", {}), ("fd_metrics_score", {"waiting-weight": 5}),
    ("least_kv_cache", {}), ("cache_aware", {}), ("estimated_ttft", {"sample": 0.5}),
    ("scheduler", {"filters": [{"name": "healthy"}], "scorers": [{"name": "queue", "weight": 2},
                                                                 {"name": "kv_cache", "weight": 2}]}),
])
def test_named_policy_routes_every_request_through_envoy(gw, policy, lb):
    gw.ai_lb(route(policy, lb))
    h.load(gw.url + CHAT, n=3, concurrency=1)  # metric policies: a scrape or two
    time.sleep(0.3)
    res = h.load(gw.url + CHAT, n=30, concurrency=6, make_body=lambda i: h.chat_body(f"q {i}", max_tokens=8))
    assert res.failed == 0, res.errors[:3]
    assert len(res.served_by) == 3, dict(res.served_by)   # load-aware, not stuck on one backend
    assert picked(gw, policy) >= 30                       # ai-lb decided, not Envoy's fallback
    assert h.eventually(lambda: h.metric_value(gw.metrics(), "ai_lb_inflight_requests"), 0) == 0  # every pick released


@pytest.mark.parametrize("policy", ["fd_metrics_score", "least_kv_cache"])
def test_metric_policies_avoid_a_loaded_backend(gw, policy):
    gw.ai_lb(route(policy))
    h.load(gw.url + CHAT, n=3, concurrency=1)
    busy = str(gw.backends[0])
    with h.Busy(gw.backends[0], prompt_words=4000):
        time.sleep(0.3)
        res = h.load(gw.url + CHAT, n=24, concurrency=3)
        assert res.failed == 0, res.errors[:3]
        assert res.served_by[busy] <= 2, dict(res.served_by)  # round robin would send it 8


def test_a_burst_inside_one_scrape_interval_spreads(gw):
    """Two backends are busy, one looks idle in the last scrape; 24 concurrent requests
    arrive before the next scrape (interval 3 s). Without assumed load all 24 would go to
    the idle-looking one."""
    gw.ai_lb(route("fd_metrics_score", {"scrape_interval": 3.0, "stale_after": 10.0}))
    h.load(gw.url + CHAT, n=2, concurrency=1)
    with h.Busy(gw.backends[1], n=4), h.Busy(gw.backends[2], n=4):
        time.sleep(3.2)                                  # one scrape sees them busy, backend 0 idle
        res = h.load(gw.url + CHAT, n=24, concurrency=24,
                     make_body=lambda i: h.chat_body(f"burst {i}", max_tokens=200))
    assert res.failed == 0, res.errors[:3]
    idle = str(gw.backends[0])
    assert res.served_by[idle] < 20, dict(res.served_by)
    assert res.served_by[str(gw.backends[1])] + res.served_by[str(gw.backends[2])] >= 4, dict(res.served_by)


@pytest.mark.parametrize("policy", ["least_request", "request_num"])
def test_a_backend_answering_503_at_once_stops_attracting_traffic(gw, policy):
    """A backend that fails fast has the fewest requests in flight, so a count-based
    policy would send it everything; its errors must count against it."""
    gw.ai_lb(route(policy))
    bad = gw.backends[0]
    h.post_json(f"http://127.0.0.1:{bad}/sim/faults", {"error_rate": 1.0, "error_status": 503})
    try:
        res = h.load(gw.url + CHAT, n=60, concurrency=3)
    finally:
        h.post_json(f"http://127.0.0.1:{bad}/sim/faults", {"reset": True})
    failures = sum(n for s, n in res.statuses.items() if s >= 500) + len(res.errors)
    assert failures <= 4, (dict(res.statuses), dict(res.served_by))   # round robin would fail 20
    assert res.statuses[200] >= 56


def _hits(gw) -> tuple[int, int]:
    st = [h.sim_state(p) for p in gw.backends]
    return sum(s["prefix_cache_hits"] for s in st), sum(s["prefix_cache_queries"] for s in st)


@pytest.mark.parametrize("policy", ["cache_aware", "estimated_ttft"])
def test_block_level_policies_find_sharing_inside_one_message(gw, policy):
    """Completions prompts that share a long document inside one string (no message
    boundary to key on): the block-level policies send them where the document is cached."""
    gw.ai_lb(route(policy))
    for p in gw.backends:
        h.post_json(f"http://127.0.0.1:{p}/reset_prefix_cache", {})
    doc = f"retrieved document {policy} " * 600           # ~4,000 tokens shared
    body = lambda i: {"model": "sim-model", "prompt": doc + f" question {i}?", "max_tokens": 4}  # noqa: E731
    h0, q0 = _hits(gw)
    res = h.load(gw.url + "/v1/completions", n=12, concurrency=1, make_body=body)
    assert res.failed == 0, res.errors[:3]
    h1, q1 = _hits(gw)
    assert (h1 - h0) / (q1 - q0) > 0.8, (h1 - h0, q1 - q0, dict(res.served_by))  # round robin: about 2/3 at best, with 3 cold copies
    assert len(res.served_by) <= 2, dict(res.served_by)
