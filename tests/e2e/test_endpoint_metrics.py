"""endpoint_metrics through the real Envoy: picks follow the simulators' /metrics.

Backend 0 is made busy by requests sent to it directly (not through the gateway) while a
slowdown fault keeps them running; requests through the gateway must then avoid it.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

import harness as h

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"


def post_json(url: str, doc: dict) -> None:
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        r.read()


def sim_state(port: int) -> dict:
    return json.loads(h.http_get(f"http://127.0.0.1:{port}/sim/state")[1])


class Busy:
    """Keep ``n`` long streaming requests running on one backend, sent to it directly."""

    def __init__(self, port: int, n: int = 9, prompt_words: int = 1) -> None:
        self.port = port
        self.res = h.LoadResult()
        post_json(f"http://127.0.0.1:{port}/sim/faults", {"slowdown": 50})
        body = h.chat_body("busy " * prompt_words, max_tokens=4000, stream=True)
        self.t = threading.Thread(target=lambda: h.load(f"http://127.0.0.1:{port}{CHAT}", n=n, concurrency=n,
                                                         res=self.res, make_body=lambda i: body), daemon=True)

    def __enter__(self) -> "Busy":
        self.t.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sim_state(self.port)["running"] >= 6:
                return self
            time.sleep(0.05)
        raise TimeoutError(f"backend {self.port} never got busy: {sim_state(self.port)}")

    def __exit__(self, *exc) -> None:
        post_json(f"http://127.0.0.1:{self.port}/sim/faults", {"reset": True})  # lets them finish fast
        self.t.join(30)


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
