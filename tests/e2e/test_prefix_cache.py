"""prefix_cache through the real Envoy with 3 simulated vLLM backends."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest

import harness as h
from aibench.redis_server import RedisServer

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
SYSTEM = "You are a helpful assistant. " * 20


def route(**lb) -> dict:
    # Every conversation here shares one system prompt, so its key alone would send them
    # all to one endpoint; a low balance threshold makes concurrent first turns spread.
    lb = {"balance_abs_threshold": 1, **lb}
    return {"llm": {"lb_policy": "prefix_cache", "endpoints": {"cluster": "llm_backends"}, "lb_config": lb}}


class Conversation:
    def __init__(self, name: str) -> None:
        self.msgs = [{"role": "system", "content": SYSTEM}]
        self.name = name
        self.turn = 0

    def next_body(self, max_tokens: int = 4) -> dict:
        if self.turn:
            self.msgs.append({"role": "assistant", "content": f"answer {self.turn} for {self.name}"})
        self.turn += 1
        self.msgs.append({"role": "user", "content": f"{self.name}: question {self.turn} " * 8})
        return {"model": "sim-model", "messages": list(self.msgs), "max_tokens": max_tokens}


async def _send(session, url: str, body: dict) -> tuple[int, str]:
    import aiohttp

    async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=20)) as r:
        await r.read()
        return r.status, r.headers.get("x-sim-server", "?")


def turns(url: str, convs: list[Conversation], concurrent: bool = False) -> list[str]:
    """One turn of each conversation; returns the backend port that served each."""
    import aiohttp

    async def go():
        async with aiohttp.ClientSession() as s:
            if concurrent:
                # longer answers so the first turns are in flight together
                res = await asyncio.gather(*(_send(s, url, c.next_body(64)) for c in convs))
            else:
                res = [await _send(s, url, c.next_body()) for c in convs]
        return res
    res = asyncio.run(go())
    assert all(st == 200 for st, _ in res), res
    return [srv for _, srv in res]


def prefix_hits(gw) -> float:
    total = 0.0
    for port in gw.backends:
        try:
            st, body = h.http_get(f"http://127.0.0.1:{port}/sim/state")
        except Exception:  # noqa: BLE001 - a crashed backend
            continue

        def walk(x):
            nonlocal total
            if isinstance(x, dict):
                for k, v in x.items():
                    if k == "prefix_cache_hits" and isinstance(v, (int, float)):
                        total += v
                    else:
                        walk(v)
            elif isinstance(x, list):
                for v in x:
                    walk(v)
        walk(json.loads(body))
    return total


def wait_until(fn, timeout: float = 3.0):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(0.05)


def idle(gw) -> bool:
    """The stream-end of the last response reaches ai-lb just after the client has it."""
    return wait_until(lambda: h.metric_value(gw.metrics(), "ai_lb_inflight_requests") == 0)


def check_sticky(gw, n_convs: int = 6, n_turns: int = 4, prefix: str = "c") -> dict[str, str]:
    convs = [Conversation(f"{prefix}{i}-{time.monotonic_ns()}") for i in range(n_convs)]
    home = turns(gw.url + CHAT, convs, concurrent=True)  # first turns in flight together
    assert len(set(home)) >= 2, home  # different conversations spread out
    for _ in range(n_turns - 1):
        assert turns(gw.url + CHAT, convs) == home  # each sticks to its first endpoint
    return {c.name: srv for c, srv in zip(convs, home)}


def test_multi_turn_conversations_stick_to_one_endpoint(gw):
    gw.ai_lb(route())
    hits0 = prefix_hits(gw)
    check_sticky(gw)
    assert prefix_hits(gw) > hits0  # the backends' prefix caches were actually reused
    assert idle(gw)
    m = gw.metrics()  # ai-lb's own view: 6 conversations x 3 later turns matched their prefix
    assert h.metric_value(m, "ai_lb_policy_events_total", route="llm", policy="prefix_cache", event="hit") >= 18


def test_endpoint_that_goes_down_loses_its_prefix_traffic(gw):
    gw.ai_lb(route())
    c = Conversation("crash")
    first = turns(gw.url + CHAT, [c])[0]
    assert turns(gw.url + CHAT, [c]) == [first]
    addr = f"127.0.0.1:{first}"
    req = urllib.request.Request(f"http://{addr}/sim/crash", data=json.dumps({"restart_after_s": 8}).encode(),
                                 headers={"content-type": "application/json"}, method="POST")
    urllib.request.urlopen(req, timeout=2).read()
    try:
        deadline = time.monotonic() + 5
        while h.envoy_host_health(gw.ports.admin, "llm_backends").get(addr) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not h.envoy_host_health(gw.ports.admin, "llm_backends")[addr]
        time.sleep(0.5)  # ai-lb's discovery interval
        moved = turns(gw.url + CHAT, [c])[0]  # succeeds, elsewhere
        assert moved != first
        for _ in range(3):
            assert turns(gw.url + CHAT, [c]) == [moved]  # and sticks to its new endpoint
    finally:
        h.wait_cluster_healthy(gw.ports.admin, "llm_backends", 3, timeout=20)
    time.sleep(0.5)
    # the old endpoint is back: the conversation stays where its prefix now lives
    assert turns(gw.url + CHAT, [c]) == [moved]


def test_redis_store_shares_prefixes_across_restarts(gw, tmp_path):
    srv = RedisServer(tmp_path).start()
    try:
        gw.ai_lb(route(redisKeyTTL=600), store=srv.url)
        convs = [Conversation(f"r{i}-{time.monotonic_ns()}") for i in range(4)]
        home = turns(gw.url + CHAT, convs, concurrent=True)
        assert turns(gw.url + CHAT, convs) == home
        import redis

        r = redis.Redis.from_url(srv.url)
        ks = r.keys("*:pc:*")
        assert len(ks) >= 8 and all(k.startswith(b"{ailb:llm|llm_backends}:pc:") for k in ks), ks[:3]
        assert 500 < r.ttl(ks[0]) <= 600
        r.close()
        # A fresh ai-lb process (empty local index) finds the prefixes in Redis.
        gw.stop_ai_lbs()
        gw.wait_envoy_sees_ai_lb(False)
        gw.ai_lb(route(redisKeyTTL=600), store=srv.url)
        assert turns(gw.url + CHAT, convs) == home
        assert idle(gw)
        # the shared in-flight counts (used by global_least_request too) went back to 0
        r = redis.Redis.from_url(srv.url)
        tag = b"{ailb:llm|llm_backends}"
        assert r.exists(tag + b":leases"), r.keys("*")[:5]  # counted through RedisCounts, same pool
        assert wait_until(lambda: all(int(v) <= 0 for v in r.hgetall(tag + b":total").values())), \
            r.hgetall(tag + b":total")
        r.close()
    finally:
        gw.stop_ai_lbs()
        srv.kill()
