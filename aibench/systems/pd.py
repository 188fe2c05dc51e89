"""``ai-lb-pd``: the reference Envoy + ai-lb's prefill/decode route + one PD sidecar per
decode server, in front of a simulated fleet started split by role (the first
``prefill`` servers prefill, the rest decode, with vLLM's NixlConnector flow).

Envoy's ``llm_backends`` holds the sidecars (the destinations); ai-lb knows the prefill
servers from the route's ``endpoints.roles``. All sidecars run in one process (``ai-lb
pd-sidecar`` with one ``--listen``/``--decode`` pair each) to spare the 2-core machine the
interpreters. Spec: ``ai-lb-pd`` (a quarter of the backends prefill, at least one),
``ai-lb-pd:P`` (P of them), optionally followed by the route's ``lb_config`` as JSON,
e.g. ``ai-lb-pd:2{"prefill":{"lb_policy":"process_tokens"}}``.
"""

from __future__ import annotations

from typing import Any

from .. import devstack as ds
from .api import Backends
from .base import _http_ok, split_inline
from .envoy import EnvoyAiLb, _port_open

SPEC = "ai-lb-pd"


def parse_spec(spec: str) -> tuple[int | None, dict[str, Any]]:
    """``ai-lb-pd[:P][{json}]`` -> (prefill servers or None for the default, lb_config)."""
    rest, inline = split_inline(spec, spec[len(SPEC):])
    cfg: dict[str, Any] = inline or {}
    if not rest:
        return None, cfg
    if not rest.startswith(":") or not rest[1:].isdigit() or int(rest[1:]) < 1:
        raise ValueError(f"system {spec!r}: expected ai-lb-pd, ai-lb-pd:P (P prefill servers) or ai-lb-pd{{json}}")
    return int(rest[1:]), cfg


def fleet_roles(spec: str, n: int) -> list[str]:
    """The role of each of the ``n`` simulated servers for this system."""
    p, _ = parse_spec(spec)
    p = max(1, n // 4) if p is None else p
    if p >= n:
        raise ValueError(f"system {spec!r}: {p} prefill servers leave no decode server among {n} backends")
    return ["prefill"] * p + ["decode"] * (n - p)


class EnvoyAiLbPd(EnvoyAiLb):
    def __init__(self, lb_config: dict[str, Any] | None = None, store: str = "memory", name: str | None = None,
                 start_timeout: float = 30.0) -> None:
        super().__init__("pd", lb_config, store=store, name=name or SPEC, start_timeout=start_timeout)
        self.sidecar_ports: list[int] = []
        self.n_prefill = 0

    def _route(self, backends: Backends) -> tuple[dict[str, Any], list[str]]:
        roles = backends.roles
        if len(roles) != len(backends.addresses) or "prefill" not in roles or "decode" not in roles:
            raise RuntimeError("ai-lb-pd needs backends started split by role (prefill and decode servers)")
        prefill = [a for a, r in zip(backends.addresses, roles) if r == "prefill"]
        decode = [a for a, r in zip(backends.addresses, roles) if r == "decode"]
        self.n_prefill = len(prefill)
        self.sidecar_ports = ds.free_ports(len(decode))
        argv = [ds.PY, "-m", "extproc", "pd-sidecar", "--log-level", "warning"]
        for port, d in zip(self.sidecar_ports, decode):
            argv += ["--listen", f"127.0.0.1:{port}", "--decode", f"http://{d}"]
        self._spawn("pd-sidecar", argv)
        self._wait(lambda: all(_port_open(p) for p in self.sidecar_ports), "the PD sidecars' ports")
        sidecars = [f"127.0.0.1:{p}" for p in self.sidecar_ports]
        route: dict[str, Any] = {"lb_policy": "pd", "endpoints": {"cluster": "llm_backends",
                                                                  "roles": {"prefill": prefill, "decode": sidecars}}}
        if self.lb_config:
            route["lb_config"] = self.lb_config
        return route, sidecars

    def _healthy_endpoints(self) -> float:
        n = super()._healthy_endpoints()  # the discovered sidecars and the (static) prefill servers
        return n - self.n_prefill if n >= 0 else n

    def sidecar_counts(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        out: dict[str, float] = {}
        for p in self.sidecar_ports:
            code, text = _http_ok(f"http://127.0.0.1:{p}/pd-sidecar/metrics", timeout=2)
            if code != 200:
                continue
            for fam in text_string_to_metric_families(text):
                for s in fam.samples:
                    if s.name == "ai_lb_pd_sidecar_requests_total":
                        k = s.labels.get("outcome", "?")
                        out[k] = out.get(k, 0.0) + s.value
        return out

    def verdict(self) -> tuple[str, list[str]]:
        status, notes = super().verdict()
        c = self.sidecar_counts()
        if c:
            notes.append("PD sidecars: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(c.items())))
        return status, notes
