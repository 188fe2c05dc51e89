"""aibench.systems: every system under test starts in front of the same simulated backends,
serves chat completions (plain and streamed), and stops without leaving processes behind."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest

from aibench import oracle as orc
from aibench import systems as sysm
from aibench.systems.api import Backends
from aibench import devstack as ds

pytestmark = pytest.mark.e2e
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sim")
    ports = ds.free_ports(3)
    sim = ds.start_sim(tmp, ports, "--model", "sim-model", "--time-scale", "0.02", "--admin-port", "-1",
                       "--seed", "1")
    yield Backends([f"127.0.0.1:{p}" for p in ports], pids={"sim": sim.p.pid})
    sim.stop()


@pytest.fixture(scope="module")
def router_venv():
    if os.environ.get("AIBENCH_SKIP_ROUTERS"):
        pytest.skip("AIBENCH_SKIP_ROUTERS set")
    try:
        return sysm.ensure_router_venv(timeout=300)
    except RuntimeError as e:
        pytest.skip(f"cannot install sglang-router / vllm-router into {sysm.router_venv()}: {str(e)[:300]}")


def chat(url: str, content: str, stream: bool, max_tokens: int = 4) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"model": "sim-model", "messages": [{"role": "user", "content": content}],
                       "max_tokens": max_tokens, "stream": stream}).encode()
    req = urllib.request.Request(url + CHAT, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def exercise(system, backends: Backends, workdir: Path, n: int = 6) -> list[str]:
    """Start, send ``n`` requests (alternately plain and streamed, distinct prompts), stop;
    returns the serving backends (x-sim-server) and checks every process is gone."""
    url = system.start(backends, workdir)
    try:
        assert url.startswith("http://127.0.0.1:")
        pids = system.pids()
        assert pids and all(not gone(p) for p in pids.values()), pids
        served = []
        for i in range(n):
            stream = i % 2 == 1
            status, headers, body = chat(url, f"request {i} from {system.name}: " + "tell me a story " * (5 + i),
                                         stream)
            assert status == 200
            if stream:
                assert headers["content-type"].startswith("text/event-stream")
                assert body.rstrip().endswith(b"data: [DONE]"), body[-200:]
            else:
                assert json.loads(body)["choices"][0]["message"]["content"]
            served.append(headers["x-sim-server"])
            if isinstance(system, (sysm.EnvoyNative, sysm.EnvoyAiLb)):  # the bench's own served-by signal
                assert headers["x-aibench-upstream"] == f"127.0.0.1:{headers['x-sim-server']}"
    finally:
        system.stop()
    system.stop()  # idempotent
    assert system.pids() == {}
    deadline = time.monotonic() + 5
    while not all(gone(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(p) for p in pids.values()), pids
    ports = {a.rsplit(":", 1)[1] for a in backends.addresses}
    assert set(served) <= ports, served
    return served


# -- Envoy --------------------------------------------------------------------------------
def test_native_config_drops_ai_lb():
    cfg = yaml_rendered()
    sysm.native_envoy_config(cfg, "least_request")
    text = json.dumps(cfg)
    assert "ext_proc" not in text and "ai_lb" not in text
    be = next(c for c in cfg["static_resources"]["clusters"] if c["name"] == "llm_backends")
    tec = be["load_balancing_policy"]["policies"][0]["typed_extension_config"]
    assert tec["name"] == "envoy.load_balancing_policies.least_request"
    assert tec["typed_config"]["@type"].endswith("least_request.v3.LeastRequest")
    with pytest.raises(RuntimeError, match="unknown Envoy"):
        sysm.native_envoy_config(yaml_rendered(), "maglev_typo")


def yaml_rendered() -> dict:
    import yaml

    return yaml.safe_load(ds.ENVOY_YAML.read_text())


def test_envoy_native_round_robin(backends, tmp_path):
    served = exercise(sysm.EnvoyNative("round_robin"), backends, tmp_path)
    assert len(set(served)) == 3, served  # round robin over 3 healthy hosts, 6 sequential requests


def test_envoy_ai_lb_least_request(backends, tmp_path):
    s = sysm.EnvoyAiLb("least_request")
    served = exercise(s, backends, tmp_path)
    assert len(set(served)) >= 2, served
    assert (tmp_path / s.name / "ai-lb.log").exists()


def test_envoy_ai_lb_unknown_policy_fails(backends, tmp_path):
    s = sysm.EnvoyAiLb("no_such_policy", start_timeout=10)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="ai-lb"):
        s.start(backends, tmp_path)
    assert time.monotonic() - t0 < 10
    assert s.pids() == {} and s.procs == []
    s.stop()


# -- Oracle -------------------------------------------------------------------------------
def test_oracle_estimate_prefers_cache_then_short_queue():
    cold_idle = orc.estimate_ttft_ms(uncached=1000, pending_prefill=0, running=0, waiting=0)
    warm_idle = orc.estimate_ttft_ms(uncached=100, pending_prefill=0, running=0, waiting=0)
    warm_busy = orc.estimate_ttft_ms(uncached=100, pending_prefill=5000, running=10, waiting=0)
    assert warm_idle < cold_idle < warm_busy
    assert orc.estimate_ttft_ms(100, 0, 0, 1) > orc.estimate_ttft_ms(100, 0, 0, 0)


def test_oracle(backends, tmp_path):
    s = sysm.Oracle()
    url = s.start(backends, tmp_path)
    try:
        assert set(s.pids()) == {"oracle"}
        # A long prompt warms one backend; the same prompt again must go where it is cached.
        prompt = "oracle cache probe " * 60
        _, h1, _ = chat(url, prompt, stream=False)
        _, h2, _ = chat(url, prompt, stream=True)
        assert h1["x-oracle-pick"].endswith(":" + h1["x-sim-server"])
        assert h2["x-sim-server"] == h1["x-sim-server"]
        # Non-inference paths are proxied too.
        with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
            assert json.loads(r.read())["data"][0]["id"] == "sim-model"
        with urllib.request.urlopen(url + "/oracle/stats", timeout=5) as r:
            stats = json.loads(r.read())
        assert sum(stats["picks"].values()) >= 3 and stats["fallbacks"] >= 1  # /v1/models: round robin
    finally:
        s.stop()
    served = exercise(sysm.Oracle(), backends, tmp_path / "again")
    assert len(served) == 6


# -- Rust routers from PyPI -----------------------------------------------------------------
@pytest.mark.peers
@pytest.mark.parametrize("cls", [sysm.SglangRouter, sysm.VllmRouter], ids=["sglang", "vllm"])
def test_rust_router_cache_aware(cls, backends, tmp_path, router_venv):
    s = cls("cache_aware")
    served = exercise(s, backends, tmp_path)
    assert len(served) == 6
    cmd = (tmp_path / s.name / "command.txt").read_text()
    assert "--policy cache_aware" in cmd and "0.0.0.0" not in cmd


@pytest.mark.peers
@pytest.mark.parametrize("cls", [sysm.SglangRouter, sysm.VllmRouter], ids=["sglang", "vllm"])
def test_rust_router_dead_backend_fails(cls, backends, tmp_path, router_venv):
    (dead,) = ds.free_ports(1)
    bad = Backends([backends.addresses[0], f"127.0.0.1:{dead}"])
    s = cls("cache_aware", start_timeout=3)
    with pytest.raises(RuntimeError, match="failed to start"):
        s.start(bad, tmp_path)
    assert s.pids() == {} and s.procs == []


# -- Prefill/decode -------------------------------------------------------------------------
def test_envoy_ai_lb_pd(tmp_path):
    """ai-lb-pd: Envoy + ai-lb's pd route + a sidecar per decode server, on a fleet split by
    role (what ai-lb bench starts for it): every request prefills on the prefill server."""
    ports = ds.free_ports(3)
    sim = ds.start_sim(tmp_path, ports, "--model", "sim-model", "--time-scale", "0.02", "--admin-port", "-1",
                       "--roles", "prefill,decode,decode")
    b = Backends([f"127.0.0.1:{p}" for p in ports], pids={"sim": sim.p.pid}, roles=["prefill", "decode", "decode"])
    s = sysm.make_system('ai-lb-pd{"prefill":{"lb_policy":"process_tokens"}}')
    try:
        url = s.start(b, tmp_path)
        assert set(s.pids()) == {"pd-sidecar", "ai-lb", "envoy"}
        served = set()
        for i in range(4):
            status, headers, body = chat(url, f"pd {i} " + "a long question " * 50, stream=i % 2 == 1)
            assert status == 200 and headers["x-pd-prefill"] == b.addresses[0]
            served.add(headers["x-sim-server"])
        assert served <= {str(ports[1]), str(ports[2])}
        assert s.verdict() == ("ok", ["PD sidecars: disaggregated 4"])
    finally:
        s.stop()
        sim.stop()
    assert s.pids() == {}
