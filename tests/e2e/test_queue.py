"""The gateway queue through the real Envoy: held requests are served when capacity frees,
shed with clear answers otherwise, and never fall open to native load balancing."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

import harness as h
from extproc.discovery.envoy_admin import ext_proc_hold_limit

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"


def route(queue: dict, static: list[str] | None = None) -> dict:
    eps = {"static": static} if static else {"cluster": "llm_backends"}
    return {"llm": {"lb_policy": "least_request", "endpoints": eps, "queue": queue}}


async def _post(s, url, max_tokens, headers=None, timeout=30.0, tag=""):
    t0 = time.monotonic()
    try:
        async with s.post(url, json=h.chat_body(f"q {tag}", max_tokens=max_tokens), headers=headers or {},
                          timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            body = await r.read()
            return {"status": r.status, "server": r.headers.get("x-sim-server"), "body": body, "tag": tag,
                    "retry_after": r.headers.get("retry-after"), "t": time.monotonic() - t0, "end": time.monotonic()}
    except asyncio.TimeoutError:
        return {"status": "client_timeout", "tag": tag}


def burst(url, specs):
    """specs: (delay_s, max_tokens, headers, timeout, tag) per request; all concurrent."""
    async def go():
        async with aiohttp.ClientSession() as s:
            async def one(d, mt, hd, to, tag):
                await asyncio.sleep(d)
                return await _post(s, url, mt, hd, to, tag)
            return await asyncio.gather(*(one(*x) for x in specs))
    return asyncio.run(go())


def qmetric(gw, name, **labels):
    return h.metric_value(gw.metrics(), name, route="llm", **labels)


def test_requests_are_held_until_an_endpoint_frees_then_served(gw):
    gw.ai_lb(route({"saturation": {"max_inflight": 1}, "max_wait": 20}))
    res = burst(gw.url + CHAT, [(0.0, 800, None, 30, str(i)) for i in range(9)])
    assert [r["status"] for r in res] == [200] * 9, res
    assert qmetric(gw, "ai_lb_queue_wait_seconds_count") >= 5        # at least 6 waited (3 ran at once)
    assert qmetric(gw, "ai_lb_fallbacks_total") == 0                 # nothing fell open to native LB
    assert qmetric(gw, "ai_lb_queue_waiting") == 0
    # Served 3 at a time: the 9 finish in 3 waves, each backend running one at a time.
    ends = sorted(r["end"] for r in res)
    assert ends[-1] - ends[0] > 1.5 * (ends[2] - ends[0] + 0.01)


def test_a_full_queue_is_429_and_a_long_wait_is_503_both_in_openai_shape(gw):
    gw.ai_lb(route({"saturation": {"max_inflight": 1}, "max_queued": 2, "max_wait": 0.4, "retry_after": 3}))
    res = burst(gw.url + CHAT, [(0.0, 8000, None, 30, "long")] * 3 + [(0.2, 8, None, 30, "q")] * 6)
    statuses = sorted(str(r["status"]) for r in res)
    assert statuses.count("200") == 3 and statuses.count("429") == 4 and statuses.count("503") == 2, statuses
    for r in res:
        if r["status"] in (429, 503):
            err = json.loads(r["body"])["error"]
            assert err["type"] == {429: "rate_limit_exceeded", 503: "service_unavailable"}[r["status"]]
            assert err["message"] and r["retry_after"] == "3"
    assert qmetric(gw, "ai_lb_queue_shed_total", reason="queue_full") == 4
    assert qmetric(gw, "ai_lb_queue_shed_total", reason="timeout") == 2


def test_a_client_that_leaves_while_queued_frees_its_place(gw):
    gw.ai_lb(route({"saturation": {"max_inflight": 1}, "max_queued": 1, "max_wait": 20}))
    res = burst(gw.url + CHAT, [(0.0, 8000, None, 30, "long")] * 3 + [(0.2, 8, None, 0.4, "gone")]
                + [(1.0, 8, None, 30, "after")])
    by = {r["tag"]: r for r in res}
    assert by["gone"]["status"] == "client_timeout"
    assert by["after"]["status"] == 200          # the place was free again (max_queued is 1)
    assert qmetric(gw, "ai_lb_queue_shed_total", reason="client_gone") == 1
    assert qmetric(gw, "ai_lb_queue_waiting") == 0
    assert qmetric(gw, "ai_lb_inflight_requests") == 0


def test_priorities_are_served_in_order(gw):
    one = [gw.addr(0)]
    gw.ai_lb(route({"saturation": {"max_inflight": 1}, "class_header": "x-priority", "max_wait": 20}, static=one))
    pr = lambda c: {"x-priority": c}  # noqa: E731
    specs = [(0.0, 8000, None, 30, "first"), (0.15, 8, pr("low"), 30, "low1"), (0.2, 8, pr("low"), 30, "low2"),
             (0.25, 8, pr("high"), 30, "high"), (0.3, 8, None, 30, "normal")]
    res = burst(gw.url + CHAT, specs)
    assert all(r["status"] == 200 for r in res), res
    order = [r["tag"] for r in sorted(res, key=lambda r: r["end"])]
    assert order == ["first", "high", "normal", "low1", "low2"], order


def test_the_queue_reads_how_long_envoy_waits_and_holds_no_longer(gw, tmp_path):
    """A held request must be answered before Envoy stops waiting for ext_proc's answer
    (its max_message_timeout): past it, Envoy would send the request on unrouted. ai-lb
    reads the limit from Envoy's admin API and caps max_wait at it, less the 1 s margin."""
    ref = json.loads(h.http_get(f"http://127.0.0.1:{gw.ports.admin}/config_dump")[1])
    assert ext_proc_hold_limit(ref) == 120.0                    # the reference config
    listen, admin, grpc_port, metrics = h.free_ports(4)
    ports = h.EnvoyPorts(listen, admin, grpc_port)
    envoy = h.start_envoy(tmp_path, ports, gw.backends, max_message_timeout=2.0)
    short = type(gw)(tmp_path, gw.backends, ports, metrics, envoy, gw.sim)
    try:
        h.wait_cluster_healthy(admin, "llm_backends", 3)
        short.ai_lb(route({"saturation": {"max_inflight": 1}, "max_wait": 20}))
        deadline = time.monotonic() + 5
        while qmetric(short, "ai_lb_queue_max_wait_seconds") != 1.0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert qmetric(short, "ai_lb_queue_max_wait_seconds") == 1.0
        res = burst(short.url + CHAT, [(0.0, 30000, None, 30, "long")] * 3 + [(0.3, 8, None, 30, "held")] * 2)
        held = [r for r in res if r["tag"] == "held"]
        assert [r["status"] for r in held] == [503, 503], held   # answered by ai-lb, not sent on unrouted
        assert all(0.8 < r["t"] < 1.9 for r in held), [r["t"] for r in held]
        assert qmetric(short, "ai_lb_queue_shed_total", reason="timeout") == 2
        assert qmetric(short, "ai_lb_fallbacks_total") == 0
    finally:
        short.stop_ai_lbs()
        envoy.stop()
