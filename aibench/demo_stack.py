"""The demo's stack: simulated vLLM servers, the reference Envoy and ai-lb on loopback, each
process recorded the moment it is spawned so that any exit stops it."""

from __future__ import annotations

import string
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import devstack as ds

MODEL = "demo-model"
# Each simulated backend's KV cache: 1,200 blocks of 16 tokens (~19k tokens), room for about
# three of the prefix phase's four long system prompts. Spread over every backend (round
# robin) they evict each other; kept apart (prefix_cache) they stay cached.
SIM_KV_BLOCKS = 1200


def step(msg: str) -> None:
    print(f"==> {msg}", flush=True)


# -- the stack --------------------------------------------------------------------------
@dataclass
class Stack:
    """Every process the demo started, plus what is needed to reach and reconfigure them."""

    tmp: Path
    backend_ports: list[int]
    names: dict[str, str]  # "127.0.0.1:port" -> backend name (the x-sim-server value)
    envoy_ports: ds.EnvoyPorts
    metrics_port: int
    config_path: Path
    procs: list[ds.Proc] = field(default_factory=list)
    ai_lb: ds.Proc | None = None
    user_config: dict | None = None  # ``ai-lb demo --config FILE``: the file's routes and settings, verbatim

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.envoy_ports.listen}"

    def write_config(self, policy: str | None) -> None:
        """Write ai-lb's config: one route ``llm`` (Envoy's route name), hosts discovered from
        Envoy; or, with ``user_config`` and no ``policy``, the user's file with only the
        addresses of this stack filled in."""
        top: dict = {}
        if self.user_config is not None and policy is None:
            top = {k: v for k, v in self.user_config.items() if k not in ("server", "routes")}
            routes = self.user_config.get("routes") or {}
            server = {k: v for k, v in (self.user_config.get("server") or {}).items()
                      if k not in ("listen", "metrics_listen", "envoy_admin", "health_listen")}
            top["server"] = server
        else:
            routes = {"llm": {"lb_policy": policy, "endpoints": {"cluster": "llm_backends"}}}
        ds.write_ai_lb_config(self.config_path, self.envoy_ports.ai_lb, self.metrics_port, routes,
                              envoy_admin_port=self.envoy_ports.admin, **top)

    def stop(self) -> None:
        """Stop in reverse start order; a process that is already gone is fine."""
        for p in reversed(self.procs):
            try:
                p.stop(timeout=3)
            except BaseException:  # noqa: BLE001 - a second Ctrl-C must not leave processes behind
                if p.alive():
                    p.p.kill()


def backend_names(n: int) -> list[str]:
    return [f"vllm-{string.ascii_lowercase[i]}" for i in range(n)]


def start_stack(tmp: Path, policy: str, backends: int, time_scale: float, user_config: dict | None = None) -> Stack:
    """Start simulator, Envoy and ai-lb, and wait until requests through Envoy reach ai-lb's pick.

    Each process is recorded in ``st.procs`` the moment it is spawned, before waiting for it
    to come up, so a Ctrl-C during start-up still stops it.
    """
    names = backend_names(backends)
    ports = ds.free_ports(backends + 4)
    bports, (listen, admin, grpc, metrics) = ports[:backends], ports[backends:]
    st = Stack(tmp, bports, {f"127.0.0.1:{p}": n for p, n in zip(bports, names)},
               ds.EnvoyPorts(listen, admin, grpc), metrics, tmp / "ai-lb.yaml", user_config=user_config)
    try:
        step(f"starting {backends} simulated vLLM servers ({', '.join(names)}), time scale {time_scale}")
        sim = launch(st, "sim", [ds.PY, "-m", "vllmsim", "serve", "--ports", ",".join(map(str, bports)),
                                 "--names", ",".join(names), "--model", MODEL, "--time-scale", str(time_scale),
                                 "--admin-port", "-1", "--seed", "1", "--exit-with-parent",
                                 "--num-gpu-blocks", str(SIM_KV_BLOCKS)])
        for port in bports:
            ds.wait_port(port, timeout=30, proc=sim)

        step(f"starting Envoy (the reference envoy.yaml) on 127.0.0.1:{listen}, admin :{admin}")
        envoy_yaml = ds.render_envoy(tmp / "envoy.yaml", st.envoy_ports, bports)
        envoy = launch(st, "envoy", [ds.envoy_binary(), "-c", str(envoy_yaml), "--log-level", "warn",
                                     "--use-dynamic-base-id", "--concurrency", "2"])
        wait_until(lambda: "LIVE" in ds.http_get(f"http://127.0.0.1:{admin}/ready", timeout=0.5)[1], 20,
                   "Envoy not ready", envoy)
        ds.wait_port(listen, proc=envoy)
        ds.wait_cluster_healthy(admin, "llm_backends", backends, timeout=15)

        step(f"starting ai-lb (policy {policy}) on 127.0.0.1:{grpc}, metrics :{metrics}")
        st.write_config(None if user_config is not None else policy)
        st.ai_lb = launch(st, "ai-lb", [ds.PY, "-m", "extproc", "serve", "-c", str(st.config_path)])
        ds.wait_port(grpc, proc=st.ai_lb)
        wait_until(lambda: all(ds.envoy_host_health(admin, "ai_lb").values() or [False]), 15,
                   "Envoy never saw ai-lb healthy", st.ai_lb)
        if user_config is None:  # (a user's route may read its cluster per request: known after one)
            wait_until(lambda: metric(st, "ai_lb_route_endpoints", route="llm", state="healthy") >= backends, 15,
                       "ai-lb never discovered the backends from Envoy's admin API", st.ai_lb)
    except BaseException:
        st.stop()
        raise
    return st


def launch(st: Stack, name: str, argv: list[str]) -> ds.Proc:
    """Spawn with output to ``<tmp>/<name>.log`` and record it for ``Stack.stop``."""
    p = ds.spawn(name, argv, st.tmp)
    st.procs.append(p)
    return p


def wait_until(cond: Any, timeout: float, what: str, proc: ds.Proc | None = None) -> None:
    """Poll ``cond`` (exceptions count as not yet) so start-up waits only as long as needed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.p.returncode}:\n{proc.log_tail()}")
        try:
            if cond():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.1)
    raise TimeoutError(what + (f":\n{proc.log_tail()}" if proc is not None else ""))


def metric(st: Stack, name: str, **labels: str) -> float:
    """Sum of ai-lb's samples ``name`` matching ``labels`` (0 when ai-lb is unreachable)."""
    return sum(v for lab, v in samples(st, name) if all(lab.get(k) == x for k, x in labels.items()))


def samples(st: Stack, name: str) -> list[tuple[dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        _, text = ds.http_get(f"http://127.0.0.1:{st.metrics_port}/metrics", timeout=1)
    except OSError:
        return []
    return [(s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name]
