"""The reference Envoy config's protection against backend failures, through a real Envoy.

What is checked here is Envoy's behaviour under the reference config (extproc/envoy/
reference/envoy.yaml): retries on another host, fast outlier ejection, idle upstream
connections closed before the backends' keep-alive, deliberate circuit breakers.
``python -m aibench.drill`` runs the longer drills (docs/reliability.md).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request

import pytest

import harness as h

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"


def _crash(stack, i: int, restart_after_s: float) -> None:
    req = urllib.request.Request(f"http://{stack.addr(i)}/sim/crash", method="POST",
                                 data=json.dumps({"restart_after_s": restart_after_s}).encode(),
                                 headers={"content-type": "application/json"})
    urllib.request.urlopen(req, timeout=2).read()


def _host_status(admin: int, cluster: str) -> dict[str, dict]:
    _, body = h.http_get(f"http://127.0.0.1:{admin}/clusters?format=json")
    out = {}
    for cs in json.loads(body).get("cluster_statuses", []):
        if cs["name"] == cluster:
            for hs in cs.get("host_statuses", []):
                sa = hs["address"]["socket_address"]
                out[f"{sa['address']}:{sa['port_value']}"] = hs.get("health_status", {})
    return out


def _stat(admin: int, name: str) -> int:
    _, body = h.http_get(f"http://127.0.0.1:{admin}/stats?filter=^{name}$")
    for line in body.splitlines():
        k, _, v = line.partition(": ")
        if k == name:
            return int(v)
    return 0


def test_reference_config_validates_with_envoy():
    r = subprocess.run([h.envoy_binary(), "--mode", "validate", "-c", str(h.ENVOY_YAML), "--use-dynamic-base-id"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "OK" in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-2000:]


def test_a_crashed_backend_is_ejected_at_once_and_its_requests_are_retried_on_another(gw):
    """ai-lb pins every request to backend 0, which dies mid-generation: Envoy's outlier
    detection ejects it well within a second, and every non-streaming request (no response
    started) is retried on another host and succeeds, and so is every request sent while
    the dead host is still ai-lb's pick."""
    gw.ai_lb({"llm": {"lb_policy": "round_robin", "endpoints": {"cluster": "llm_backends", "static": [gw.addr(0)]}}})
    res = h.LoadResult()
    t = threading.Thread(target=lambda: h.load(gw.url + CHAT, n=36, concurrency=12, res=res,
                                               make_body=lambda i: h.chat_body(f"r{i}", max_tokens=6000)))
    t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    _crash(gw, 0, restart_after_s=4)
    ejected_after = None
    while time.monotonic() - t0 < 3:
        if _host_status(gw.ports.admin, "llm_backends")[gw.addr(0)].get("failed_outlier_check"):
            ejected_after = time.monotonic() - t0
            break
        time.sleep(0.02)
    t.join(60)
    try:
        assert ejected_after is not None and ejected_after < 1.0, ejected_after
        assert res.failed == 0, (res.statuses, res.errors[:3])
        assert res.total == 36
        others = res.served_by[str(gw.backends[1])] + res.served_by[str(gw.backends[2])]
        assert others >= 12, (res.served_by, sorted(res.latencies)[::10])  # the ones in flight at the crash went elsewhere
        assert _stat(gw.ports.admin, "cluster.llm_backends.upstream_rq_retry") >= 12
    finally:
        h.wait_cluster_healthy(gw.ports.admin, "llm_backends", 3, timeout=20)


def test_idle_upstream_connections_close_before_the_backends_keep_alive(gw):
    """uvicorn (vLLM, SGLang) closes idle connections after 5 s; Envoy must close first (3 s),
    so it never writes a request into a connection the backend is closing."""
    gw.ai_lb({"llm": {"lb_policy": "round_robin", "endpoints": {"cluster": "llm_backends"}}})
    before = _stat(gw.ports.admin, "cluster.llm_backends.upstream_cx_idle_timeout")
    res = h.load(gw.url + CHAT, n=3, concurrency=1)
    assert res.failed == 0
    deadline = time.monotonic() + 4.5
    while time.monotonic() < deadline and _stat(gw.ports.admin, "cluster.llm_backends.upstream_cx_idle_timeout") <= before:
        time.sleep(0.1)
    assert _stat(gw.ports.admin, "cluster.llm_backends.upstream_cx_idle_timeout") > before


def test_circuit_breakers_are_set_deliberately(gw):
    """Envoy's default of 1,024 concurrent requests on the ai_lb cluster would let requests
    past it bypass ai-lb silently; the reference sets its own limits (README)."""
    _, text = h.http_get(f"http://127.0.0.1:{gw.ports.admin}/clusters")
    assert "ai_lb::default_priority::max_requests::10000" in text
    assert "llm_backends::default_priority::max_requests::4096" in text
    assert "llm_backends::default_priority::max_connections::4096" in text
    text = json.dumps(json.loads(h.http_get(f"http://127.0.0.1:{gw.ports.admin}/config_dump")[1]))
    assert '"timeout": "0s"' in text and "300s" in text  # no route timeout; the stream idle timeout stays
