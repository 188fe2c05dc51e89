"""The peers ai-lb is compared with: the Rust routers from PyPI (sglang-router, vllm-router,
installed on first use outside the source tree) and the oracle."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path


from .. import devstack as ds
from .api import Backends
from .base import _Base, _http_ok

ROUTER_PACKAGES = ("sglang-router", "vllm-router")
_OK_MARKER = ".aibench-routers-ok"

# -- Rust routers from PyPI -------------------------------------------------------------
def router_venv() -> Path:
    """Where the routers are installed: ``$AIBENCH_ROUTER_VENV``, else the user's cache
    (never the source tree)."""
    if os.environ.get("AIBENCH_ROUTER_VENV"):
        return Path(os.environ["AIBENCH_ROUTER_VENV"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ai-lb" / "bench-venv"


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
        self.metrics_port = 0
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
        self.port, self.metrics_port = ds.free_ports(2)
        workers = [f"http://{a}" for a in backends.addresses]
        self.command = self.argv(self._exe_path, self.port, self.metrics_port, workers) + self.extra_args
        (self.logdir / "command.txt").write_text(" ".join(self.command) + "\n")  # type: ignore[union-attr]
        self._spawn(self.proc_name, self.command, env={"NO_COLOR": "1", "RUST_LOG_STYLE": "never"})
        n = len(workers)
        self._wait(lambda: self._ready(n), f"{self.proc_name} on :{self.port} ready with {n} healthy workers")
        return f"http://127.0.0.1:{self.port}"


    # Neither router names the worker in its responses; both count requests per worker in
    # their Prometheus metrics (label worker="http://ip:port").
    served_metric = ""

    def served_counts(self) -> tuple[str, dict[str, float]] | None:
        code, text = _http_ok(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2)
        if code != 200:
            return None
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith(self.served_metric + "{") and 'worker="' in line:
                w = line.split('worker="', 1)[1].split('"', 1)[0].removeprefix("http://").removeprefix("https://")
                out[w] = out.get(w, 0.0) + float(line.rsplit(" ", 1)[1])
        return f"{self.proc_name} metric {self.served_metric}", out


def _cache_aware_defaults() -> list[str]:
    # The routers' documented defaults, spelt out so a report shows exactly what ran.
    return ["--cache-threshold", "0.3", "--balance-abs-threshold", "64", "--balance-rel-threshold", "1.5"]


class SglangRouter(_RustRouter):
    """``sglang-router launch`` (SGLang Model Gateway), default policy ``cache_aware``."""

    exe = "sglang-router"
    proc_name = "sglang-router"
    served_metric = "smg_worker_cb_outcomes_total"  # its circuit breaker's outcome per request and worker

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
    served_metric = "vllm_router_processed_requests_total"

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
        self.port = 0
        self._stats0: dict = {}

    def start(self, backends: Backends, workdir: Path) -> str:
        # Refuse before starting anything: not a start failure to debug, a system that cannot run here.
        import asyncio

        from ..oracle import REFUSAL, not_simulators

        bad = asyncio.run(not_simulators(backends.addresses))
        if bad:
            raise RuntimeError(REFUSAL.format(bad=", ".join(bad)))
        return super().start(backends, workdir)

    def _start(self, backends: Backends) -> str:
        (port,) = ds.free_ports(1)
        self.port = port
        self._spawn("oracle", [ds.PY, "-m", "aibench.oracle", "--host", "127.0.0.1", "--port", str(port),
                               "--backends", ",".join(backends.addresses)])
        self._wait(lambda: _http_ok(f"http://127.0.0.1:{port}/oracle/health")[0] == 200, f"oracle on :{port}")
        self._stats0 = self._stats()
        return f"http://127.0.0.1:{port}"

    def _stats(self) -> dict:
        import json

        code, body = _http_ok(f"http://127.0.0.1:{self.port}/oracle/stats", timeout=2)
        return json.loads(body) if code == 200 else {}

    def verdict(self) -> tuple[str, list[str]]:
        """Degraded whenever a decision could not see the caches (it went round robin)."""
        s = self._stats()
        if not s:
            return "degraded", ["could not read /oracle/stats after the run"]
        n = s.get("decisions", 0) - self._stats0.get("decisions", 0)
        bad = s.get("probe_failures", 0) - self._stats0.get("probe_failures", 0)
        if bad:
            return "degraded", [f"{bad} of {n} decisions could not probe any backend and went round robin"]
        return "ok", []
