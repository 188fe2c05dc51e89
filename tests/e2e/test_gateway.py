"""Gateway core through the real Envoy binary, with simulated vLLM backends on loopback."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

import harness as h

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"


def pin(stack, i: int, policy: str = "round_robin", **extra) -> dict:
    """A route whose only candidate is backend ``i``: the policy's choice is unmistakable."""
    return {"lb_policy": policy, "endpoints": {"cluster": "llm_backends", "static": [stack.addr(i)]}, **extra}


def served(res: h.LoadResult) -> dict[str, int]:
    return dict(res.served_by)


TRANSPORTS = pytest.mark.parametrize("transport", ["native", "grpcio"])


@TRANSPORTS
def test_policy_is_honoured(gw, transport):
    gw.ai_lb({"llm": pin(gw, 1)}, server={"transport": transport})
    res = h.load(gw.url + CHAT, n=30, concurrency=3)
    assert res.failed == 0, res.errors[:3]
    assert served(res) == {str(gw.backends[1]): 30}


def test_round_robin_spreads_over_all_healthy_endpoints(gw):
    gw.ai_lb({"llm": {"lb_policy": "round_robin", "endpoints": {"cluster": "llm_backends"}}})
    res = h.load(gw.url + CHAT, n=30, concurrency=1)
    assert res.failed == 0
    assert sorted(served(res).values()) == [10, 10, 10]


def test_spoofed_destination_header_is_ignored(gw):
    gw.ai_lb({"llm": pin(gw, 2)})
    spoof = {"x-gateway-destination-endpoint": gw.addr(0)}
    res = h.load(gw.url + CHAT, n=20, concurrency=2, headers=spoof)
    assert served(res) == {str(gw.backends[2]): 20}
    # On a route where ai-lb is off, the spoofed header must not steer either.
    res = h.load(gw.url + "/native" + CHAT, n=30, concurrency=1, headers=spoof)
    assert res.failed == 0
    assert len(served(res)) == 3 and max(served(res).values()) <= 12


def test_route_disabled_in_envoy_uses_native_lb(gw):
    gw.ai_lb({"llm": pin(gw, 0)})
    res = h.load(gw.url + "/native" + CHAT, n=30, concurrency=1)
    assert res.failed == 0
    assert sorted(served(res).values()) == [10, 10, 10]  # Envoy's round robin, not the pin


def test_route_disabled_in_ai_lb_config_uses_native_lb(gw):
    gw.ai_lb({"llm": pin(gw, 0, enabled=False)})
    res = h.load(gw.url + CHAT, n=30, concurrency=1)
    assert res.failed == 0
    assert len(served(res)) == 3
    assert h.metric_value(gw.metrics(), "ai_lb_fallbacks_total", route="llm", reason="route_disabled") == 30


def test_bodyless_request_passes_straight_through(gw):
    gw.ai_lb({"llm": pin(gw, 0, policy="test_model_pin")}, plugins=["plugins.model_pin"])
    t0 = time.monotonic()
    res = h.load(gw.url + "/v1/models", n=10, concurrency=2, method="GET")
    assert res.failed == 0, res.errors[:3]
    assert time.monotonic() - t0 < 5
    body = h.http_get(gw.url + "/v1/models")[1]
    assert json.loads(body)["object"] == "list"
    m = gw.metrics()
    assert h.metric_value(m, "ai_lb_requests_skipped_total", route="llm", reason="no_body") >= 10
    assert h.metric_value(m, "ai_lb_fallbacks_total", route="llm") == 0  # not a fallback: no alert noise


def test_body_policy_routes_by_prompt_and_malformed_json_falls_back(gw):
    gw.ai_lb({"llm": {"lb_policy": "test_model_pin", "endpoints": {"cluster": "llm_backends"}}},
             plugins=["plugins.model_pin"])
    res = h.load(gw.url + CHAT, n=12, concurrency=3, make_body=lambda i: h.chat_body(model="sim-model"))
    assert res.failed == 0 and len(served(res)) == 1  # one model -> one endpoint
    # Malformed JSON: the backend answers (its own 400), the gateway neither fails nor hangs.
    res = h.load(gw.url + CHAT, n=9, concurrency=3, data=b'{"model": "sim-model", "messages": [')
    assert res.errors == [] and set(res.statuses) == {400}
    assert len(served(res)) == 3  # native round robin, not the pin
    m = gw.metrics()
    assert h.metric_value(m, "ai_lb_fallbacks_total", route="llm", reason="malformed_json") == 9
    # Binary garbage, too.
    res = h.load(gw.url + CHAT, n=3, concurrency=1, data=bytes(range(256)) * 4)
    assert res.errors == [] and 200 not in res.statuses
    assert h.metric_value(gw.metrics(), "ai_lb_fallbacks_total", route="llm", reason="malformed_json") == 12


def test_huge_body_is_not_rejected_by_the_gateway(gw):
    gw.ai_lb({"llm": {"lb_policy": "test_model_pin", "endpoints": {"cluster": "llm_backends"}}},
             plugins=["plugins.model_pin"])
    big = h.chat_body("x" * (220 * 1024))
    res = h.load(gw.url + CHAT, n=4, concurrency=2, make_body=lambda i: big)
    assert res.failed == 0, (res.statuses, res.errors[:2])
    huge = json.dumps(h.chat_body("y" * (9 * 1024 * 1024))).encode()  # over Envoy's 8 MiB buffer
    res = h.load(gw.url + CHAT, n=1, concurrency=1, data=huge)
    assert res.errors == [] and 413 not in res.statuses and 500 not in res.statuses, res.statuses
    m = gw.metrics()  # Envoy's buffer limit truncates it, or ai-lb's max_body_bytes refuses it
    assert sum(h.metric_value(m, "ai_lb_fallbacks_total", route="llm", reason=r) for r in ("body_truncated", "body_too_large")) == 1


@TRANSPORTS
def test_killing_ai_lb_during_traffic_fails_no_request(gw, transport):
    p = gw.ai_lb({"llm": pin(gw, 1, policy="least_request")}, server={"transport": transport})
    res = h.LoadResult()
    t = threading.Thread(target=lambda: h.load(gw.url + CHAT, duration=4.0, concurrency=8, res=res,
                                               make_body=lambda i: h.chat_body(f"q{i}", max_tokens=8, stream=i % 2 == 0)))
    t.start()
    time.sleep(1.5)
    before = res.served_by[str(gw.backends[1])]
    p.kill()
    t.join()
    assert res.total > 50
    assert res.failed == 0, (res.statuses, res.errors[:3])
    assert before > 10  # the pin was in force before the kill ...
    assert len(res.served_by) == 3  # ... and native LB took over after it


def test_reload_switches_policy_under_traffic_without_failures(gw):
    gw.ai_lb({"llm": pin(gw, 0)})
    res = h.LoadResult()
    t = threading.Thread(target=lambda: h.load(gw.url + CHAT, duration=3.0, concurrency=4, res=res))
    t.start()
    time.sleep(1.0)
    gw.write_config({"llm": pin(gw, 2, policy="least_request")})
    time.sleep(1.0)
    mid = dict(res.served_by)
    t.join()
    assert res.failed == 0, (res.statuses, res.errors[:3])
    assert set(res.served_by) == {str(gw.backends[0]), str(gw.backends[2])}
    assert res.served_by[str(gw.backends[2])] > mid.get(str(gw.backends[2]), 0)  # traffic moved to the new pin
    m = gw.metrics()
    assert h.metric_value(m, "ai_lb_decisions_total", route="llm", policy="least_request", outcome="picked") > 0
    assert h.metric_value(m, "ai_lb_config_reloads_total", result="applied") == 1


def test_invalid_reload_keeps_old_config_and_sighup_reloads(gw):
    p = gw.ai_lb({"llm": pin(gw, 0)})
    gw.config_path().write_text("routes: {llm: {lb_policy: nonsense}}\n")
    time.sleep(0.8)
    res = h.load(gw.url + CHAT, n=10, concurrency=2)
    assert served(res) == {str(gw.backends[0]): 10}
    assert h.metric_value(gw.metrics(), "ai_lb_config_reloads_total", result="rejected") >= 1
    assert "routes.llm.lb_policy: unknown policy 'nonsense'" in p.log_tail()
    # A valid file again, and an explicit SIGHUP.
    gw.write_config({"llm": pin(gw, 1)}, server={"reload_interval": 3600})
    p.signal(signal.SIGHUP)
    time.sleep(0.5)
    res = h.load(gw.url + CHAT, n=10, concurrency=2)
    assert served(res) == {str(gw.backends[1]): 10}


@TRANSPORTS
def test_done_fires_once_per_request_including_aborts(gw, transport):
    gw.ai_lb({"llm": {"lb_policy": "least_request", "endpoints": {"cluster": "llm_backends"}}}, server={"transport": transport})
    ok = h.load(gw.url + CHAT, n=20, concurrency=4, make_body=lambda i: h.chat_body(max_tokens=20, stream=True))
    assert ok.failed == 0

    async def aborting() -> None:
        import asyncio

        import aiohttp
        async with aiohttp.ClientSession() as s:
            async def one():
                try:
                    async with s.post(gw.url + CHAT, json=h.chat_body(max_tokens=2000, stream=True),
                                      timeout=aiohttp.ClientTimeout(total=0.3)) as r:
                        async for _ in r.content:
                            pass
                except Exception:
                    pass
            await asyncio.gather(*(one() for _ in range(6)))

    import asyncio
    asyncio.run(aborting())
    time.sleep(0.5)
    m = gw.metrics()
    picked = h.metric_value(m, "ai_lb_decisions_total", route="llm", outcome="picked")
    done = h.metric_value(m, "ai_lb_requests_done_total", route="llm")
    assert picked == 26 and done == 26
    assert h.metric_value(m, "ai_lb_inflight_requests") == 0


def test_unhealthy_endpoint_is_never_picked(gw):
    gw.ai_lb({"llm": {"lb_policy": "round_robin", "endpoints": {"cluster": "llm_backends"}}})
    import urllib.request
    # Crash backend 0 (connections refused) and have it come back after a while.
    req = urllib.request.Request(f"http://{gw.addr(0)}/sim/crash", data=json.dumps({"restart_after_s": 6}).encode(),
                                 headers={"content-type": "application/json"}, method="POST")
    urllib.request.urlopen(req, timeout=2).read()
    deadline = time.monotonic() + 5
    while h.envoy_host_health(gw.ports.admin, "llm_backends").get(gw.addr(0)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not h.envoy_host_health(gw.ports.admin, "llm_backends")[gw.addr(0)]
    time.sleep(0.5)  # ai-lb's discovery interval
    res = h.load(gw.url + CHAT, n=30, concurrency=3)
    assert res.failed == 0, (res.statuses, res.errors[:3])
    assert sorted(res.served_by) == sorted([str(gw.backends[1]), str(gw.backends[2])])
    h.wait_cluster_healthy(gw.ports.admin, "llm_backends", 3, timeout=15)


def test_long_stream_holds_its_in_flight_count_until_the_end(gw):
    """The ext_proc stream must live as long as the HTTP stream: "done" is not early."""
    gw.ai_lb({"llm": {"lb_policy": "least_request", "endpoints": {"cluster": "llm_backends"}}})
    res = h.LoadResult()
    # ~2 s of streaming at this time scale
    t = threading.Thread(target=lambda: h.load(gw.url + CHAT, n=1, concurrency=1, res=res,
                                               make_body=lambda i: h.chat_body(max_tokens=16000, stream=True)))
    t0 = time.monotonic()
    t.start()
    samples = []
    while t.is_alive():
        samples.append((time.monotonic() - t0, h.metric_value(gw.metrics(), "ai_lb_inflight_requests")))
        time.sleep(0.2)
    t.join()
    elapsed = time.monotonic() - t0
    assert res.failed == 0 and elapsed > 1.5, (res.statuses, elapsed)
    assert all(n == 1 for ts, n in samples if 0.3 < ts < elapsed - 0.4), samples
    assert h.eventually(lambda: h.metric_value(gw.metrics(), "ai_lb_inflight_requests"), 0) == 0
