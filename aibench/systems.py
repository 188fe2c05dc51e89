"""The systems under test, each started in front of the same ``Backends``.

* ``EnvoyNative(policy)``: the reference ``envoy/envoy.yaml`` without ai-lb (ext_proc filter and
  ai_lb cluster removed), the backends' cluster balanced by Envoy itself (``round_robin``,
  ``least_request`` or ``random``).
* ``EnvoyAiLb(policy, lb_config, store)``: the reference config as shipped + ``python -m extproc
  serve`` with one route ``llm`` (hosts discovered from Envoy's admin API).
* ``SglangRouter(policy)`` / ``VllmRouter(policy)``: the Rust routers from PyPI
  (``sglang-router``, ``vllm-router``), installed on first use into ``.bench-venv/`` (or the venv
  named by ``$AIBENCH_ROUTER_VENV``) because they pull in heavy dependencies.
* ``Oracle()``: ``aibench.oracle``, a proxy that asks every simulated server for its true cache
  hits and queue before each request.

Every ``start`` is bounded (``start_timeout``, 30 s by default, not counting a first-time router
install) and on failure stops what it started and raises ``RuntimeError`` with the log tails.
``stop`` is idempotent. Logs go to ``workdir/<system name>/``.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from extproc import devstack as ds

from .systems_api import Backends

__all__ = ["EnvoyNative", "EnvoyAiLb", "SglangRouter", "VllmRouter", "Oracle", "ensure_router_venv",
           "router_venv", "native_envoy_config", "SYSTEM_FACTORIES"]

ENVOY_CONCURRENCY = 2  # worker threads, the same for every Envoy-based system
ROUTER_PACKAGES = ("sglang-router", "vllm-router")
_OK_MARKER = ".aibench-routers-ok"


# -- helpers ----------------------------------------------------------------------------
def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise RuntimeError(f"backend address must be ip:port, got {addr!r}")
    return host.strip("[]"), int(port)


def _http_ok(url: str, timeout: float = 0.5) -> tuple[int, str]:
    try:
        return ds.http_get(url, timeout=timeout)
    except (OSError, ValueError):
        return 0, ""


class _Base:
    """Process bookkeeping shared by every system: spawn, bounded waits, failure, stop."""

    name: str = "system"

    def __init__(self, start_timeout: float = 30.0) -> None:
        self.start_timeout = start_timeout
        self.procs: list[ds.Proc] = []
        self.logdir: Path | None = None
        self.url: str | None = None
        self._deadline = 0.0

    # lifecycle helpers
    def _begin(self, backends: Backends, workdir: Path) -> None:
        if self.procs:
            raise RuntimeError(f"{self.name}: already started")
        if not backends.addresses:
            raise RuntimeError(f"{self.name}: no backends")
        self.logdir = Path(workdir) / self.name
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._deadline = time.monotonic() + self.start_timeout

    def _left(self) -> float:
        return max(0.1, self._deadline - time.monotonic())

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> ds.Proc:
        assert self.logdir is not None
        try:
            p = ds.spawn(name, argv, self.logdir, env=env)
        except OSError as e:
            raise RuntimeError(f"{self.name}: cannot start {name} ({argv[0]}): {e}") from e
        self.procs.append(p)
        return p

    def _wait(self, cond: Callable[[], Any], what: str) -> None:
        """Poll ``cond`` until true (exceptions count as not yet) or the start deadline."""
        while True:
            for p in self.procs:
                if not p.alive():
                    raise RuntimeError(f"{p.name} exited with {p.p.returncode} while waiting for: {what}")
            try:
                if cond():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.monotonic() >= self._deadline:
                raise RuntimeError(f"timed out after {self.start_timeout:g}s waiting for: {what}")
            time.sleep(0.1)

    def _fail(self, err: BaseException) -> RuntimeError:
        tails = "\n".join(f"--- {p.name} log ({p.log_path}) ---\n{p.log_tail(3000)}" for p in self.procs)
        self.stop()
        return RuntimeError(f"{self.name} failed to start: {err}\n{tails}")

    def start(self, backends: Backends, workdir: Path) -> str:
        self._begin(backends, workdir)
        try:
            self.url = self._start(backends)
        except BaseException as e:
            err = self._fail(e)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise err from e
        return self.url

    def _start(self, backends: Backends) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def stop(self) -> None:
        """Stop every process (reverse start order); safe to call any number of times."""
        for p in reversed(self.procs):
            try:
                p.stop(timeout=5)
            except Exception:  # noqa: BLE001
                pass
            try:  # anything the process left in its own session (start_new_session=True)
                os.killpg(p.p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError, OSError):
                pass
        self.procs.clear()
        self.url = None

    def pids(self) -> dict[str, int]:
        return {p.name: p.p.pid for p in self.procs if p.alive()}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


# -- Envoy ------------------------------------------------------------------------------
_LB_POLICIES = {
    "round_robin": ("envoy.load_balancing_policies.round_robin",
                    "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin"),
    "least_request": ("envoy.load_balancing_policies.least_request",
                      "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest"),
    "random": ("envoy.load_balancing_policies.random",
               "type.googleapis.com/envoy.extensions.load_balancing_policies.random.v3.Random"),
}


def _set_backend_addresses(cfg: dict, addresses: list[str]) -> None:
    for c in cfg["static_resources"]["clusters"]:
        if c["name"] == "llm_backends":
            c["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
                {"endpoint": {"address": {"socket_address": {"address": h, "port_value": p}}}}
                for h, p in map(_split, addresses)]


def _render(dst: Path, ports: ds.EnvoyPorts, addresses: list[str]) -> dict:
    """The reference config with our ports and the real backend addresses."""
    ds.render_envoy(dst, ports, [_split(a)[1] for a in addresses])
    cfg = yaml.safe_load(dst.read_text())
    _set_backend_addresses(cfg, addresses)
    return cfg


def native_envoy_config(cfg: dict, policy: str) -> dict:
    """Turn the (rendered) reference config into plain Envoy: no ext_proc filter, no ai_lb
    cluster, ``llm_backends`` balanced by ``policy``. Edits ``cfg`` in place and returns it."""
    if policy not in _LB_POLICIES:
        raise RuntimeError(f"unknown Envoy load balancing policy {policy!r}; choose from {sorted(_LB_POLICIES)}")
    ext_proc = "envoy.filters.http.ext_proc"
    for lst in cfg["static_resources"]["listeners"]:
        for chain in lst["filter_chains"]:
            for f in chain["filters"]:
                tc = f.get("typed_config", {})
                if "http_filters" in tc:
                    tc["http_filters"] = [x for x in tc["http_filters"] if x["name"] != ext_proc]
                for vh in tc.get("route_config", {}).get("virtual_hosts", []):
                    for r in vh.get("routes", []):
                        tpf = r.get("typed_per_filter_config")
                        if tpf and ext_proc in tpf:
                            del tpf[ext_proc]
                            if not tpf:
                                del r["typed_per_filter_config"]
    cfg["static_resources"]["clusters"] = [c for c in cfg["static_resources"]["clusters"] if c["name"] != "ai_lb"]
    ext, typ = _LB_POLICIES[policy]
    for c in cfg["static_resources"]["clusters"]:
        if c["name"] == "llm_backends":
            c["load_balancing_policy"] = {"policies": [{"typed_extension_config": {"name": ext, "typed_config": {"@type": typ}}}]}
    return cfg


class _EnvoyBase(_Base):
    def __init__(self, start_timeout: float = 30.0) -> None:
        super().__init__(start_timeout)
        self.ports: ds.EnvoyPorts | None = None

    def _start_envoy(self, cfg: dict, n_backends: int) -> ds.Proc:
        assert self.logdir is not None and self.ports is not None
        path = self.logdir / "envoy.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        p = self._spawn("envoy", [ds.envoy_binary(), "-c", str(path), "--log-level", "warn",
                                  "--use-dynamic-base-id", "--concurrency", str(ENVOY_CONCURRENCY)])
        admin = self.ports.admin
        self._wait(lambda: "LIVE" in _http_ok(f"http://127.0.0.1:{admin}/ready")[1], "Envoy admin /ready")
        self._wait(lambda: _port_open(self.ports.listen), f"Envoy listener :{self.ports.listen}")
        self._wait(lambda: sum(ds.envoy_host_health(admin, "llm_backends").values()) >= n_backends,
                   f"Envoy health checks: {n_backends} healthy hosts in llm_backends")
        return p


def _port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class EnvoyNative(_EnvoyBase):
    """The reference Envoy without ai-lb: Envoy's own ``round_robin`` / ``least_request`` / ``random``."""

    def __init__(self, policy: str = "round_robin", name: str | None = None, start_timeout: float = 30.0) -> None:
        super().__init__(start_timeout)
        self.policy = policy
        self.name = name or f"envoy-{policy.replace('_', '-')}"

    def _start(self, backends: Backends) -> str:
        listen, admin, unused = ds.free_ports(3)
        self.ports = ds.EnvoyPorts(listen, admin, unused)
        assert self.logdir is not None
        cfg = native_envoy_config(_render(self.logdir / "envoy.yaml", self.ports, backends.addresses), self.policy)
        self._start_envoy(cfg, len(backends.addresses))
        return f"http://127.0.0.1:{listen}"


class EnvoyAiLb(_EnvoyBase):
    """The reference Envoy + ai-lb (``python -m extproc serve``), route ``llm`` with ``policy``."""

    def __init__(self, policy: str = "least_request", lb_config: dict[str, Any] | None = None,
                 store: str = "memory", name: str | None = None, start_timeout: float = 30.0) -> None:
        super().__init__(start_timeout)
        self.policy = policy
        self.lb_config = dict(lb_config or {})
        self.store = store
        self.name = name or f"ai-lb-{policy.replace('_', '-')}" + ("-redis" if store != "memory" else "")
        self.metrics_port = 0

    def _healthy_endpoints(self) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        code, text = _http_ok(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=1)
        if code != 200:
            return -1
        return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == "ai_lb_route_endpoints" and s.labels.get("route") == "llm"
                   and s.labels.get("state") == "healthy")

    def _start(self, backends: Backends) -> str:
        listen, admin, grpc, metrics = ds.free_ports(4)
        self.ports = ds.EnvoyPorts(listen, admin, grpc)
        self.metrics_port = metrics
        assert self.logdir is not None
        n = len(backends.addresses)
        route: dict[str, Any] = {"lb_policy": self.policy, "endpoints": {"cluster": "llm_backends"}}
        if self.lb_config:
            route["lb_config"] = self.lb_config
        cfg_path = self.logdir / "ai-lb.yaml"
        ds.write_ai_lb_config(cfg_path, grpc, metrics, {"llm": route}, envoy_admin_port=admin, store=self.store)
        # ai-lb first: it validates its config and exits at once on an unknown policy.
        self._spawn("ai-lb", [ds.PY, "-m", "extproc", "serve", "-c", str(cfg_path)])
        self._wait(lambda: _port_open(grpc), f"ai-lb gRPC port :{grpc}")
        self._start_envoy(_render(self.logdir / "envoy.yaml", self.ports, backends.addresses), n)
        self._wait(lambda: all(ds.envoy_host_health(admin, "ai_lb").values() or [False]),
                   "Envoy sees ai-lb healthy (gRPC health check)")
        self._wait(lambda: self._healthy_endpoints() >= n,
                   f'ai-lb discovered {n} healthy endpoints (ai_lb_route_endpoints{{route="llm",state="healthy"}})')
        return f"http://127.0.0.1:{listen}"


# -- Rust routers from PyPI -------------------------------------------------------------
def router_venv() -> Path:
    return Path(os.environ.get("AIBENCH_ROUTER_VENV") or ds.ROOT / ".bench-venv")


def ensure_router_venv(timeout: float = 900.0) -> Path:
    """Create the routers' venv (``python -m venv`` + ``pip install sglang-router vllm-router``)
    unless it is there already. Serialised with a lock file so concurrent harnesses install once."""
    venv = router_venv()
    if (venv / _OK_MARKER).exists():
        return venv
    venv.mkdir(parents=True, exist_ok=True)  # lock and log live inside it: nothing else to clean up
    lock_path = venv / ".aibench-install.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / _OK_MARKER).exists():
            return venv
        log = venv / "aibench-install.log"
        deadline = time.monotonic() + timeout
        with open(log, "wb") as out:
            steps = []
            if not (venv / "bin" / "python").exists():
                steps.append([sys.executable, "-m", "venv", str(venv)])
            steps.append([str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                          "-q", *ROUTER_PACKAGES])
            for argv in steps:
                try:
                    r = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT,
                                       timeout=max(1.0, deadline - time.monotonic()))
                except (subprocess.TimeoutExpired, OSError) as e:
                    raise RuntimeError(f"installing {' '.join(ROUTER_PACKAGES)} into {venv} failed: {e}") from e
                if r.returncode != 0:
                    tail = log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}); log {log}:\n{tail}")
        (venv / _OK_MARKER).write_text(" ".join(ROUTER_PACKAGES) + "\n")
    return venv


class _RustRouter(_Base):
    exe = ""
    proc_name = ""

    def __init__(self, policy: str = "cache_aware", extra_args: list[str] | None = None, name: str | None = None,
                 start_timeout: float = 30.0, install: bool = True) -> None:
        super().__init__(start_timeout)
        self.policy = policy
        self.extra_args = list(extra_args or [])
        self.install = install
        self.name = name or f"{self.proc_name}-{policy.replace('_', '-')}"
        self.port = 0
        self.command: list[str] = []
        self._exe_path = Path()

    def executable(self) -> Path:
        venv = router_venv()
        exe = venv / "bin" / self.exe
        if not exe.exists() or not (venv / _OK_MARKER).exists():
            if not self.install:
                raise RuntimeError(f"{exe} not found (run aibench.systems.ensure_router_venv())")
            ensure_router_venv()
        if not exe.exists():
            raise RuntimeError(f"{exe} missing after installing {' '.join(ROUTER_PACKAGES)}")
        return exe

    def start(self, backends: Backends, workdir: Path) -> str:
        exe = self.executable()  # a first-time install is not part of the start deadline
        self._exe_path = exe
        return super().start(backends, workdir)

    def argv(self, exe: Path, port: int, metrics_port: int, workers: list[str]) -> list[str]:
        raise NotImplementedError

    def _ready(self, n: int) -> bool:
        code, _ = _http_ok(f"http://127.0.0.1:{self.port}/health")
        return code == 200

    def _start(self, backends: Backends) -> str:
        # vllm-router marks every worker healthy at start (its first health check runs a minute
        # later) and serves with a dead one; so check the backends ourselves first.
        down: list[str] = []

        def all_up() -> bool:
            down[:] = [a for a in backends.addresses if _http_ok(f"http://{a}/health")[0] != 200]
            return not down

        try:
            self._wait(all_up, "every backend to answer GET /health with 200")
        except RuntimeError as e:
            raise RuntimeError(f"{e}; not answering: {', '.join(down)}") from None
        self.port, metrics_port = ds.free_ports(2)
        workers = [f"http://{a}" for a in backends.addresses]
        self.command = self.argv(self._exe_path, self.port, metrics_port, workers) + self.extra_args
        (self.logdir / "command.txt").write_text(" ".join(self.command) + "\n")  # type: ignore[union-attr]
        self._spawn(self.proc_name, self.command, env={"NO_COLOR": "1", "RUST_LOG_STYLE": "never"})
        n = len(workers)
        self._wait(lambda: self._ready(n), f"{self.proc_name} on :{self.port} ready with {n} healthy workers")
        return f"http://127.0.0.1:{self.port}"


def _cache_aware_defaults() -> list[str]:
    # The routers' documented defaults, spelt out so a report shows exactly what ran.
    return ["--cache-threshold", "0.3", "--balance-abs-threshold", "64", "--balance-rel-threshold", "1.5"]


class SglangRouter(_RustRouter):
    """``sglang-router launch`` (SGLang Model Gateway), default policy ``cache_aware``."""

    exe = "sglang-router"
    proc_name = "sglang-router"

    def argv(self, exe: Path, port: int, metrics_port: int, workers: list[str]) -> list[str]:
        a = [str(exe), "launch", "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *workers,
             "--policy", self.policy]
        if self.policy == "cache_aware":
            a += _cache_aware_defaults()
        return a + ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
                    "--worker-startup-timeout-secs", str(max(1, int(self.start_timeout))),
                    "--worker-startup-check-interval", "1",
                    "--shutdown-grace-period-secs", "1", "--log-level", "warn"]

    def _ready(self, n: int) -> bool:
        # /health answers OK before (and whether or not) the workers are registered: ask /workers.
        code, body = _http_ok(f"http://127.0.0.1:{self.port}/workers")
        if code != 200:
            return False
        import json

        ws = json.loads(body).get("workers", [])
        return sum(1 for w in ws if w.get("is_healthy")) >= n


class VllmRouter(_RustRouter):
    """``vllm-router`` (vLLM's production stack router), default policy ``cache_aware``."""

    exe = "vllm-router"
    proc_name = "vllm-router"

    def argv(self, exe: Path, port: int, metrics_port: int, workers: list[str]) -> list[str]:
        a = [str(exe), "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *workers,
             "--policy", self.policy]
        if self.policy == "cache_aware":
            a += _cache_aware_defaults()
        # It only opens its port once every worker answers /health, within the startup timeout.
        return a + ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
                    "--worker-startup-timeout-secs", str(max(1, int(self.start_timeout))),
                    "--worker-startup-check-interval", "1", "--log-level", "warning"]


# -- Oracle -----------------------------------------------------------------------------
class Oracle(_Base):
    """``python -m aibench.oracle``: picks by the simulators' true prefix-cache hits and queues."""

    def __init__(self, name: str = "oracle", start_timeout: float = 30.0) -> None:
        super().__init__(start_timeout)
        self.name = name

    def _start(self, backends: Backends) -> str:
        (port,) = ds.free_ports(1)
        self._spawn("oracle", [ds.PY, "-m", "aibench.oracle", "--host", "127.0.0.1", "--port", str(port),
                               "--backends", ",".join(backends.addresses)])
        self._wait(lambda: _http_ok(f"http://127.0.0.1:{port}/oracle/health")[0] == 200, f"oracle on :{port}")
        return f"http://127.0.0.1:{port}"


SYSTEM_FACTORIES: dict[str, Callable[[], Any]] = {
    "envoy-rr": lambda: EnvoyNative("round_robin"),
    "envoy-lr": lambda: EnvoyNative("least_request"),
    "ai-lb-lr": lambda: EnvoyAiLb("least_request"),
    "ai-lb-prefix": lambda: EnvoyAiLb("prefix_cache"),
    "sglang-cache-aware": lambda: SglangRouter("cache_aware"),
    "vllm-router-cache-aware": lambda: VllmRouter("cache_aware"),
    "oracle": lambda: Oracle(),
}
