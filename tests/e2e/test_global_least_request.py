"""global_least_request end to end: two gateways (Envoy + ai-lb each) share one Redis and
three simulated vLLM servers."""

from __future__ import annotations

import threading
import time

import pytest

import harness as h
from extproc.state.redis_counts import pool_keys

pytestmark = pytest.mark.e2e
CHAT = "/v1/chat/completions"
POOL = "llm|llm_backends"


class TwoGateways(h.TwoGateways):
    def start_ai_lb(self, i, lease_ttl=10.0):
        super().start_ai_lb(i, {"llm": {"lb_policy": "global_least_request",
                                        "lb_config": {"lease_ttl": lease_ttl, "timeout": 50},
                                        "endpoints": {"cluster": "llm_backends"}}})

    def totals(self):
        return {k.decode(): int(v) for k, v in self.r.hgetall(pool_keys(POOL)[0]).items()}


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    t = TwoGateways(tmp_path_factory.mktemp("glr"))
    yield t
    t.stop()


@pytest.fixture
def fresh(two):
    two.r.flushall()
    yield two
    for g in two.gws:
        if g["ai"]:
            g["ai"].stop()
            g["ai"] = None


def hold(url, n, res, max_tokens=16000):
    """Open ``n`` long streams in the background (each ~2 s); returns the thread."""
    t = threading.Thread(target=lambda: h.load(url, n=n, concurrency=n, res=res,
                                               make_body=lambda i: h.chat_body(f"long {i}", max_tokens=max_tokens, stream=True)))
    t.start()
    return t


def wait_total(two, want, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(two.totals().values()) == want:
            return two.totals()
        time.sleep(0.05)
    raise AssertionError(f"total in flight never reached {want}: {two.totals()}")


def test_two_instances_share_counts(fresh):
    two = fresh
    two.start_ai_lb(0)
    two.start_ai_lb(1)
    r0, r1 = h.LoadResult(), h.LoadResult()
    t0 = hold(two.url(0), 5, r0)
    snap = wait_total(two, 5)
    assert sorted(snap.values()) == [1, 2, 2]            # gateway 0 spread its five
    idle = min(snap, key=snap.get)
    t1 = hold(two.url(1), 1, r1)                          # gateway 1 must see gateway 0's load
    t1.join()
    t0.join()
    assert r0.failed == r1.failed == 0, (r0.statuses, r1.statuses, r0.errors[:2])
    assert r1.served_by == {idle.rsplit(":", 1)[1]: 1}
    wait_total(two, 0)                                    # every request decremented exactly once


def test_killed_instance_leaks_no_counts(fresh):
    two = fresh
    two.start_ai_lb(0, lease_ttl=1.0)
    two.start_ai_lb(1, lease_ttl=1.0)
    r0 = h.LoadResult()
    t0 = hold(two.url(0), 3, r0, max_tokens=30000)
    wait_total(two, 3)
    two.gws[0]["ai"].kill()                               # its three decrements will never come
    time.sleep(1.5)                                       # > lease_ttl
    h.load(two.url(1), n=1, concurrency=1)                # any decision reaps expired leases
    assert sum(two.totals().values()) <= 1
    t0.join()
    assert r0.failed == 0                                  # the streams themselves were unharmed
    wait_total(two, 0)


def test_redis_restart_mid_traffic_fails_no_request(fresh):
    two = fresh
    two.start_ai_lb(0)
    res = h.LoadResult()
    t = threading.Thread(target=lambda: h.load(two.url(0), duration=4.0, concurrency=4, res=res,
                                               make_body=lambda i: h.chat_body(f"q{i}", max_tokens=40, stream=i % 2 == 0)))
    t.start()
    time.sleep(1.0)
    two.redis.kill()
    time.sleep(1.0)
    two.redis.start()
    t.join()
    assert res.total > 40 and res.failed == 0, (res.total, res.statuses, res.errors[:3])
    m = h.metrics_text(two.gws[0]["metrics"])
    assert h.metric_value(m, "ai_lb_state_events_total", event="local_pick") > 0   # counted, not hidden
    assert h.metric_value(m, "ai_lb_decisions_total", outcome="picked") == res.total  # no native fallbacks
    wait_total(two, 0, timeout=5)                          # resynchronised, then drained to zero


def test_max_request_count_answers_429_through_envoy(fresh):
    two = fresh
    g = two.gws[0]
    cfg = h.write_ai_lb_config(g["dir"] / "ai-lb.yaml", g["grpc"], g["metrics"], {
        "llm": {"lb_policy": "global_least_request", "lb_config": {"maxRequestCount": 1},
                "endpoints": {"cluster": "llm_backends"}}}, envoy_admin_port=g["admin"], store=two.redis.url)
    g["ai"] = h.start_ai_lb(g["dir"], cfg, g["grpc"], name="ai-lb-cap")
    time.sleep(0.6)
    held = h.LoadResult()
    t = hold(two.url(0), 3, held)
    wait_total(two, 3)
    import urllib.request
    req = urllib.request.Request(two.url(0), data=b'{"model":"sim-model","messages":[{"role":"user","content":"x"}]}',
                                 headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(req, timeout=5)
    assert ei.value.code == 429
    assert "maxRequestCount=1" in ei.value.read().decode()
    t.join()
    assert held.failed == 0
    wait_total(two, 0)
