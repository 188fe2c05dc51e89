"""Through the real Envoy: one blocking round trip per request, the request's end learned
from Envoy's gRPC access log, and the fallbacks when that log is missing."""

from __future__ import annotations

import threading
import time

import harness as h

ROUTE = {"llm": {"lb_policy": "least_request", "endpoints": {"cluster": "llm_backends"}}}


def inflight(metrics_port: int) -> float:
    return h.metric_value(h.metrics_text(metrics_port), "ai_lb_inflight_requests")


def completions(metrics_port: int, how: str) -> float:
    return h.metric_value(h.metrics_text(metrics_port), "ai_lb_completions_total", how=how)


def envoy_stat(admin: int, name: str) -> int:
    _, body = h.http_get(f"http://127.0.0.1:{admin}/stats?filter=^{name}$")
    return int(body.split(":")[1]) if ":" in body else 0


def long_request(url: str) -> threading.Thread:
    t = threading.Thread(target=lambda: h.load(url + h.CHAT, n=1, concurrency=1, make_body=lambda i: h.chat_body(
        "tell me a long story", max_tokens=1500, stream=True)), daemon=True)
    t.start()
    return t


def test_one_round_trip_yet_in_flight_until_the_response_ends(stack):
    stack.ai_lb(ROUTE, server={"completions": "access_log"})
    for port in stack.backends:
        h.post_json(f"http://127.0.0.1:{port}/sim/faults", {"slowdown": 5})   # ~1.5 s per answer
    try:
        sent0 = envoy_stat(stack.ports.admin, "http.llm.ext_proc.stream_msgs_sent")
        t = long_request(stack.url)
        assert h.eventually(lambda: inflight(stack.metrics_port), 1.0) == 1.0
        time.sleep(0.3)   # well inside the answer
        # the request's ext_proc stream is over (one message, one answer), the request is not
        assert envoy_stat(stack.ports.admin, "http.llm.ext_proc.streams_started") == \
            envoy_stat(stack.ports.admin, "http.llm.ext_proc.streams_closed")
        assert envoy_stat(stack.ports.admin, "http.llm.ext_proc.stream_msgs_sent") - sent0 == 1
        assert inflight(stack.metrics_port) == 1.0 and t.is_alive()
        t.join(20)
    finally:
        for port in stack.backends:
            h.post_json(f"http://127.0.0.1:{port}/sim/faults", {"reset": True})
    assert h.eventually(lambda: inflight(stack.metrics_port), 0.0) == 0.0
    assert completions(stack.metrics_port, "access_log") == 1
    stack.stop_ai_lbs()


def test_the_access_log_reports_upstream_errors_grpcio_transport_too(stack):
    stack.ai_lb(ROUTE, server={"completions": "access_log", "transport": "grpcio"})
    for port in stack.backends:
        h.post_json(f"http://127.0.0.1:{port}/sim/faults", {"error_rate": 1.0, "error_status": 503})
    try:
        res = h.load(stack.url + h.CHAT, n=6, concurrency=2)
    finally:
        for port in stack.backends:
            h.post_json(f"http://127.0.0.1:{port}/sim/faults", {"reset": True})
    assert res.statuses == {503: 6}
    m = lambda: h.metric_value(stack.metrics(), "ai_lb_requests_done_total", outcome="error")  # noqa: E731
    assert h.eventually(m, 6.0) == 6.0
    assert h.metric_value(stack.metrics(), "ai_lb_served_endpoint_total") == 6   # the served host, from the log
    stack.stop_ai_lbs()


def test_without_the_access_log_auto_holds_the_stream_and_a_forced_one_expires(stack, tmp_path):
    listen, admin, grpc, metrics = h.free_ports(4)
    envoy = h.start_envoy(tmp_path, h.EnvoyPorts(listen, admin, grpc), stack.backends, access_log=False)
    url = f"http://127.0.0.1:{listen}"
    ai = None
    try:
        h.wait_cluster_healthy(admin, "llm_backends", 3)
        for server in ({"completions": "auto"}, {"completions": "access_log", "completion_lease": 1.0}):
            cfg = h.write_ai_lb_config(tmp_path / "ai-lb.yaml", grpc, metrics, ROUTE, envoy_admin_port=admin,
                                       server=server)
            ai = h.start_ai_lb(tmp_path, cfg, grpc)
            time.sleep(0.6)
            assert h.load(url + h.CHAT, n=3, concurrency=1).statuses == {200: 3}
            if server["completions"] == "auto":    # held to the response's end, as before
                assert h.eventually(lambda: inflight(metrics), 0.0) == 0.0
                assert completions(metrics, "stream") == 3 and completions(metrics, "access_log") == 0
            else:                                   # nothing reports the end: the lease does
                assert inflight(metrics) == 3.0
                assert h.eventually(lambda: inflight(metrics), 0.0, timeout=5) == 0.0
                assert completions(metrics, "expired") == 3
                assert h.metric_value(h.metrics_text(metrics), "ai_lb_requests_done_total", outcome="expired") == 3
            ai.stop()
            ai = None
    finally:
        if ai is not None:
            ai.stop()
        envoy.stop()
