"""precise_prefix_cache through the real Envoy, with simulators that publish vLLM's KV-cache
events and evict under pressure: each request goes to the server that really holds the
longest prefix of its prompt, checked against the simulator's own cache (``/sim/match``)
before every request, including when the caches change behind ai-lb's back (another
gateway warming a server, a flood evicting a server's documents)."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

import harness as h
import vllmsim

pytestmark = pytest.mark.e2e

N = 3
BLOCKS = 96          # x 16 tokens: ~4 documents of ~400 tokens per server, so they evict


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("precise")
    backends = h.free_ports(N)
    listen, admin, grpc, metrics = h.free_ports(4)
    kv = h.free_port_range(N, avoid=backends)
    rep = h.free_port_range(N, avoid=[*backends, *range(kv, kv + N)])
    ev = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{kv}",
          "replay_endpoint": f"tcp://127.0.0.1:{rep}"}
    sim = h.start_sim(tmp, backends, "--model", "sim-model", "--time-scale", "0.01", "--admin-port", "-1",
                      "--num-gpu-blocks", str(BLOCKS), "--block-size", "16", "--kv-events-config", json.dumps(ev))
    ports = h.EnvoyPorts(listen, admin, grpc)
    envoy = h.start_envoy(tmp, ports, backends)
    h.wait_cluster_healthy(admin, "llm_backends", N)
    addrs = [f"127.0.0.1:{p}" for p in backends]
    lb = {"tokenizer": str(vllmsim.MODEL_DIR), "scrape_interval": 0.1,
          "kv_events": {"endpoint": "tcp://127.0.0.1:{port}", "bind": True,
                        "endpoints": {a: f"tcp://127.0.0.1:{kv + i}" for i, a in enumerate(addrs)},
                        "replay_endpoints": {a: f"tcp://127.0.0.1:{rep + i}" for i, a in enumerate(addrs)}}}
    cfg = h.write_ai_lb_config(tmp / "ai-lb.yaml", grpc, metrics, {
        "llm": {"lb_policy": "precise_prefix_cache", "lb_config": lb, "endpoints": {"cluster": "llm_backends"}}},
        envoy_admin_port=admin)
    ai = h.start_ai_lb(tmp, cfg, grpc)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not all(h.envoy_host_health(admin, "ai_lb").values() or [False]):
        time.sleep(0.1)
    time.sleep(0.6)   # first discovery
    yield {"url": f"http://127.0.0.1:{listen}", "backends": backends, "metrics": metrics, "ai": ai}
    ai.stop()
    envoy.stop()
    sim.stop()


def post(url: str, doc: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=20) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()} | {"_body": r.read()}


def cached_tokens(port: int, doc: dict) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/sim/match", data=json.dumps(doc).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())["cached_tokens"]


DOC_WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


def doc_request(d: int, q: int) -> dict:
    text = " ".join(f"{DOC_WORDS[d]} document line {i}" for i in range(70))     # ~450 tokens, distinct per d
    return {"model": "sim-model", "max_tokens": 2,
            "messages": [{"role": "system", "content": text}, {"role": "user", "content": f"question {q}"}]}


def check(stack, doc: dict, stats: dict, settle: float = 0.25) -> str:
    """Send ``doc`` through Envoy; assert it went to a server holding the longest cached
    prefix (the simulator's own view, asked just before). Returns the server's port."""
    time.sleep(settle)      # events of the previous request have arrived
    truth = {str(p): cached_tokens(p, doc) for p in stack["backends"]}
    status, hdr = post(stack["url"] + h.CHAT, doc)
    assert status == 200
    server = hdr["x-sim-server"]
    best = max(truth.values())
    stats["requests"] += 1
    if best > 0:
        stats["held"] += 1
        if truth[server] != best:
            open("/tmp/kv_e2e_metrics.txt", "w").write(h.metrics_text(stack["metrics"]))
        assert truth[server] == best, (truth, server)
        assert int(hdr["x-sim-cached-tokens"]) == best        # and the engine did hit it
    return server


def test_every_request_goes_where_its_prefix_really_is_as_caches_evict(stack):
    stats = {"requests": 0, "held": 0}
    # Warm-up: every engine publishes something, so ai-lb's subscribers have heard each one.
    for p in stack["backends"]:
        for i in range(3):
            post(f"http://127.0.0.1:{p}{h.CHAT}", h.chat_body(f"warm {i} " * 40, max_tokens=1))
    # Phase 0: a document asked twice in a row is held the second time (by whoever got it).
    for d in range(3):
        check(stack, doc_request(d, 100), stats)
        check(stack, doc_request(d, 101), stats)
    # Phase 1: eight documents, two questions each, rotating: more than the fleet holds.
    for rnd in range(2):
        for d in range(8):
            check(stack, doc_request(d, rnd), stats)
    # Phase 2: another gateway warms document 0 and 1 on server 2 directly, and floods
    # every other server with distinct prompts (evicting what ai-lb sent there).
    s2 = stack["backends"][2]
    post(f"http://127.0.0.1:{s2}{h.CHAT}", doc_request(0, 99))
    post(f"http://127.0.0.1:{s2}{h.CHAT}", doc_request(1, 99))
    for p in stack["backends"][:2]:
        for i in range(8):
            post(f"http://127.0.0.1:{p}{h.CHAT}", h.chat_body(f"flood {p} {i} " * 60, max_tokens=1))
    assert check(stack, doc_request(0, 7), stats) == str(s2)
    assert check(stack, doc_request(1, 7), stats) == str(s2)
    for d in range(2, 8):
        check(stack, doc_request(d, 8), stats)
    assert stats["held"] >= 5, stats        # phases 0 and 2 guarantee 5 with a holder; phase 1 depends on eviction
    text = h.metrics_text(stack["metrics"])
    hits = h.metric_value(text, "ai_lb_policy_events_total", route="llm", event="precise_hit")
    assert hits >= stats["held"] - 2, (hits, stats)
    assert h.metric_value(text, "ai_lb_policy_events_total", route="llm", event="events:messages") > 10
    assert h.metric_value(text, "ai_lb_policy_events_total", route="llm", event="events:gaps") == 0
