"""Test helpers: the local stack (from ``aibench.devstack``) plus client load and metrics."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from pathlib import Path

import json
import threading
import urllib.request

from aibench.devstack import *  # noqa: F401,F403 - re-exported for the tests
from aibench.devstack import EXTRA_PYTHONPATH, http_get

ROOT = Path(__file__).resolve().parents[1]  # the source checkout
EXTRA_PYTHONPATH.append(str(ROOT / "tests"))  # ai-lb subprocesses can load tests/plugins


def metrics_text(port: int) -> str:
    return http_get(f"http://127.0.0.1:{port}/metrics")[1]


def metric_value(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


# -- client load ------------------------------------------------------------------------
@dataclass
class LoadResult:
    statuses: Counter = field(default_factory=Counter)
    served_by: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.statuses.values()) + len(self.errors)

    @property
    def failed(self) -> int:
        return sum(n for s, n in self.statuses.items() if s != 200) + len(self.errors)


def eventually(probe: Callable[[], Any], want: Any, timeout: float = 5.0) -> Any:
    """Poll ``probe`` until it returns ``want`` (bounded); returns the last value seen. For
    state that settles just after a response: Envoy ends the ext_proc stream (and ai-lb
    releases the request) a moment after the client has its last byte."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def chat_body(prompt: str = "hello", max_tokens: int = 4, stream: bool = False, model: str = "sim-model") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": stream}


async def _one(session, url: str, res: LoadResult, *, body: Any = None, data: bytes | None = None,
               headers: dict | None = None, method: str = "POST") -> None:
    import aiohttp

    t0 = time.perf_counter()
    try:
        kw: dict[str, Any] = {"headers": headers or {}}
        if data is not None:
            kw["data"] = data
        elif body is not None:
            kw["json"] = body
        async with session.request(method, url, timeout=aiohttp.ClientTimeout(total=30), **kw) as r:
            await r.read()
            res.statuses[r.status] += 1
            res.served_by[r.headers.get("x-sim-server", "?")] += 1
    except Exception as e:  # noqa: BLE001
        res.errors.append(repr(e))
    res.latencies.append(time.perf_counter() - t0)


async def run_load(url: str, *, n: int | None = None, duration: float | None = None, concurrency: int = 4,
                   make_body=lambda i: chat_body(f"request {i}"), headers: dict | None = None,
                   method: str = "POST", data: bytes | None = None, res: LoadResult | None = None) -> LoadResult:
    """Closed-loop load, bounded by count and/or time (always bounded)."""
    import aiohttp

    assert n is not None or duration is not None
    res = res or LoadResult()
    deadline = time.monotonic() + (duration if duration is not None else 120.0)
    counter = iter(range(n if n is not None else 10**9))

    async def worker(session) -> None:
        for i in counter:
            if time.monotonic() >= deadline:
                return
            await _one(session, url, res, body=None if data is not None or method == "GET" else make_body(i),
                       data=data, headers=headers, method=method)

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
    return res


def load(url: str, **kw: Any) -> LoadResult:
    return asyncio.run(run_load(url, **kw))


# -- simulator control ------------------------------------------------------------------
CHAT = "/v1/chat/completions"


def post_json(url: str, doc: dict) -> None:
    req = urllib.request.Request(url, data=json.dumps(doc).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        r.read()


def sim_state(port: int) -> dict:
    return json.loads(http_get(f"http://127.0.0.1:{port}/sim/state")[1])


class Busy:
    """Keep ``n`` long streaming requests running on one backend, sent to it directly."""

    def __init__(self, port: int, n: int = 9, prompt_words: int = 1) -> None:
        self.port = port
        self.n = n
        self.res = LoadResult()
        post_json(f"http://127.0.0.1:{port}/sim/faults", {"slowdown": 50})
        # Distinct prompts (no shared prefix), so long ones really fill the KV cache.
        self.t = threading.Thread(target=lambda: load(
            f"http://127.0.0.1:{port}{CHAT}", n=n, concurrency=n, res=self.res,
            make_body=lambda i: chat_body(f"{i} " + "busy " * prompt_words, max_tokens=4000, stream=True)), daemon=True)

    def __enter__(self) -> "Busy":
        self.t.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sim_state(self.port)["running"] >= min(6, self.n):
                return self
            time.sleep(0.05)
        raise TimeoutError(f"backend {self.port} never got busy: {sim_state(self.port)}")

    def __exit__(self, *exc) -> None:
        post_json(f"http://127.0.0.1:{self.port}/sim/faults", {"reset": True})  # lets them finish fast
        self.t.join(30)


class TwoGateways:
    """Two gateways (an Envoy and an ai-lb each) sharing one Redis and three simulated
    vLLM servers: what a fleet of ai-lb replicas looks like."""
    def __init__(self, tmp):
        self.tmp = tmp
        self.backends = free_ports(3)
        from aibench.redis_server import RedisServer
        import redis

        self.redis = RedisServer(tmp).start()
        self.sim = start_sim(tmp, self.backends, "--model", "sim-model", "--time-scale", "0.02",
                               "--max-model-len", "1000000", "--admin-port", "-1", name="sim-glr")
        self.gws = []
        for i in range(2):
            listen, admin, grpc, metrics = free_ports(4)
            d = tmp / f"gw{i}"
            d.mkdir()
            env = start_envoy(d, EnvoyPorts(listen, admin, grpc), self.backends)
            self.gws.append({"dir": d, "listen": listen, "admin": admin, "grpc": grpc, "metrics": metrics, "envoy": env, "ai": None})
        for g in self.gws:
            wait_cluster_healthy(g["admin"], "llm_backends", 3)
        self.r = redis.Redis(port=self.redis.port)

    def metrics(self, i):
        return metrics_text(self.gws[i]["metrics"])

    def start_ai_lb(self, i, routes):
        g = self.gws[i]
        cfg = write_ai_lb_config(g["dir"] / "ai-lb.yaml", g["grpc"], g["metrics"], routes, envoy_admin_port=g["admin"],
                                 store=self.redis.url)
        g["ai"] = start_ai_lb(g["dir"], cfg, g["grpc"], name=f"ai-lb-{i}")
        time.sleep(0.6)  # discovery

    def url(self, i):
        return f"http://127.0.0.1:{self.gws[i]['listen']}{CHAT}"

    def stop(self):
        for g in self.gws:
            if g["ai"]:
                g["ai"].stop()
            g["envoy"].stop()
        self.sim.stop()
        self.redis.kill()
