"""Envoy-based systems: the reference Envoy with its own load balancing, and with ai-lb."""

from __future__ import annotations

import json

from pathlib import Path
from typing import Any

import yaml

from .. import devstack as ds
from .api import Backends
from .base import _Base, _http_ok, _split

ENVOY_CONCURRENCY = 2  # worker threads, the same for every Envoy-based system

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


UPSTREAM_HEADER = "x-aibench-upstream"


def add_upstream_header(cfg: dict) -> dict:
    """Every response names the backend that served it (Envoy's ``%UPSTREAM_HOST%``, the
    address Envoy connected to), whatever chose it: Envoy's own LB or ai-lb's pick."""
    for lst in cfg["static_resources"]["listeners"]:
        for chain in lst["filter_chains"]:
            for f in chain["filters"]:
                rc = f.get("typed_config", {}).get("route_config")
                if rc is not None:
                    rc.setdefault("response_headers_to_add", []).append(
                        {"header": {"key": UPSTREAM_HEADER, "value": "%UPSTREAM_HOST%"},
                         "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"})
    return cfg


def _render(dst: Path, ports: ds.EnvoyPorts, addresses: list[str]) -> dict:
    """The reference config with our ports, the real backend addresses and the upstream header."""
    ds.render_envoy(dst, ports, [_split(a)[1] for a in addresses])
    cfg = yaml.safe_load(dst.read_text())
    _set_backend_addresses(cfg, addresses)
    return add_upstream_header(cfg)


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
                if "access_log" in tc:  # ai-lb's completion channel
                    tc["access_log"] = [a for a in tc["access_log"] if "ai_lb" not in json.dumps(a)]
                    if not tc["access_log"]:
                        del tc["access_log"]
                for vh in tc.get("route_config", {}).get("virtual_hosts", []):
                    for r in vh.get("routes", []):
                        tpf = r.get("typed_per_filter_config")
                        if tpf and ext_proc in tpf:
                            del tpf[ext_proc]
                            if not tpf:
                                del r["typed_per_filter_config"]
    for lst in cfg["static_resources"]["listeners"]:  # the registered instances come from ai-lb (EDS)
        for chain in lst["filter_chains"]:
            for f in chain["filters"]:
                for vh in f.get("typed_config", {}).get("route_config", {}).get("virtual_hosts", []):
                    vh["routes"] = [r for r in vh.get("routes", []) if r.get("route", {}).get("cluster") != "llm_registered"]
    cfg["static_resources"]["clusters"] = [c for c in cfg["static_resources"]["clusters"]
                                           if c["name"] not in ("ai_lb", "llm_registered")]
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
        # ``queue`` in the system's inline config is the route's gateway queue, not lb_config.
        self.queue: dict[str, Any] | None = self.lb_config.pop("queue", None)
        self.store = store
        self.name = name or (f"ai-lb-{policy.replace('_', '-')}" + ("-queue" if self.queue else "")
                             + ("-redis" if store != "memory" else ""))
        self.metrics_port = 0
        self._fallbacks0: dict[str, float] = {}

    def _fallbacks(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        code, text = _http_ok(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2)
        if code != 200:
            return {}
        return {s.labels.get("reason", "?"): s.value for fam in text_string_to_metric_families(text)
                for s in fam.samples if s.name == "ai_lb_fallbacks_total"}

    def verdict(self) -> tuple[str, list[str]]:
        """ai-lb handing requests to Envoy's own LB is fail-open working as designed, but the
        policy did not pick those: say how many and why."""
        now = self._fallbacks()
        d = {k: v - self._fallbacks0.get(k, 0.0) for k, v in now.items() if v - self._fallbacks0.get(k, 0.0) > 0}
        if not d:
            return "ok", []
        why = ", ".join(f"{k} {v:.0f}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))
        return "ok", [f"ai-lb fell back to Envoy's load balancing for {sum(d.values()):.0f} requests ({why})"]

    def _healthy_endpoints(self) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        code, text = _http_ok(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=1)
        if code != 200:
            return -1
        return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == "ai_lb_route_endpoints" and s.labels.get("route") == "llm"
                   and s.labels.get("state") == "healthy")

    def _route(self, backends: Backends) -> tuple[dict[str, Any], list[str]]:
        """Route ``llm``'s config and the addresses Envoy's llm_backends holds."""
        route: dict[str, Any] = {"lb_policy": self.policy, "endpoints": {"cluster": "llm_backends"}}
        if self.lb_config:
            route["lb_config"] = self.lb_config
        if self.queue:
            route["queue"] = self.queue
        return route, list(backends.addresses)

    def _start(self, backends: Backends) -> str:
        listen, admin, grpc, metrics = ds.free_ports(4)
        self.ports = ds.EnvoyPorts(listen, admin, grpc)
        self.metrics_port = metrics
        assert self.logdir is not None
        route, upstreams = self._route(backends)
        n = len(upstreams)
        cfg_path = self.logdir / "ai-lb.yaml"
        ds.write_ai_lb_config(cfg_path, grpc, metrics, {"llm": route}, envoy_admin_port=admin, store=self.store)
        # ai-lb first: it validates its config and exits at once on an unknown policy.
        self._spawn("ai-lb", [ds.PY, "-m", "extproc", "serve", "-c", str(cfg_path)])
        self._wait(lambda: _port_open(grpc), f"ai-lb gRPC port :{grpc}")
        self._start_envoy(_render(self.logdir / "envoy.yaml", self.ports, upstreams), n)
        self._fallbacks0 = self._fallbacks()
        self._wait(lambda: all(ds.envoy_host_health(admin, "ai_lb").values() or [False]),
                   "Envoy sees ai-lb healthy (gRPC health check)")
        self._wait(lambda: self._healthy_endpoints() >= n,
                   f'ai-lb discovered {n} healthy endpoints (ai_lb_route_endpoints{{route="llm",state="healthy"}})')
        return f"http://127.0.0.1:{listen}"
