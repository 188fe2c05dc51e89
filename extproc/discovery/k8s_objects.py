"""Kubernetes objects (as the API serves them, plain JSON dicts) to ai-lb endpoints.

Pure functions, so the readiness rules are testable against JSON shaped exactly as in the
Kubernetes API reference:

* a Pod is an endpoint once it has an IP; it is healthy when it is ``Running``, its
  ``Ready`` condition is ``"True"`` and it is not being deleted (a terminating pod keeps
  serving its open requests but gets no new ones);
* an EndpointSlice endpoint is healthy when ``conditions.ready`` is true or unset (the API
  says consumers should read an unknown state as ready) and it is not ``terminating``;
  FQDN slices are skipped (override_host needs an IP);
* an InferencePool (``inference.networking.k8s.io/v1``) gives a label selector
  (``spec.selector.matchLabels``) and a port (``spec.targetPorts[0].number``);
* a pod declares its prefill/decode role with llm-d's label ``llm-d.ai/role``
  (``prefill``, ``decode``, or ``both``: mixed); EndpointSlices carry no pod labels.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Iterable, Mapping

from ..core.endpoint import Endpoint

ROLE_LABEL = "llm-d.ai/role"
_ROLE_VALUES = {"prefill": "prefill", "decode": "decode", "both": "mixed", "mixed": "mixed"}


def host_port(ip: str, port: int) -> str:
    """``ip:port`` as Envoy keys its hosts (``[v6]:port`` for IPv6)."""
    try:
        v6 = ipaddress.ip_address(ip).version == 6
    except ValueError:
        v6 = False
    return f"[{ip}]:{port}" if v6 else f"{ip}:{port}"


def pod_endpoint(pod: Mapping[str, Any], port: int) -> Endpoint | None:
    status = pod.get("status") or {}
    ip = status.get("podIP")
    if not ip:
        return None  # not scheduled or no network yet: not an endpoint at all
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())
    meta = pod.get("metadata") or {}
    terminating = bool(meta.get("deletionTimestamp"))
    healthy = status.get("phase") == "Running" and ready and not terminating
    role = _ROLE_VALUES.get(str((meta.get("labels") or {}).get(ROLE_LABEL, "")).lower(), "")
    return Endpoint(host_port(ip, port), healthy, role)


def pods_to_endpoints(pods: Iterable[Mapping[str, Any]], port: int) -> tuple[Endpoint, ...]:
    out: dict[str, Endpoint] = {}
    for p in pods:
        e = pod_endpoint(p, port)
        if e is not None:  # an IP reused by two pods (one leaving): healthy wins
            prev = out.get(e.address)
            out[e.address] = e if prev is None or e.healthy else prev
    return tuple(out[a] for a in sorted(out))


def slice_port(es: Mapping[str, Any], port: int | str | None) -> int | None:
    """The slice's port number for ``port`` (a number, a port name, or None: the only one)."""
    ports = [p for p in es.get("ports") or () if p.get("port")]
    if port is None:
        return ports[0]["port"] if len(ports) == 1 else None
    for p in ports:
        if (isinstance(port, int) and p["port"] == port) or (isinstance(port, str) and p.get("name") == port):
            return p["port"]
    return None


def slices_to_endpoints(slices: Iterable[Mapping[str, Any]], port: int | str | None) -> tuple[Endpoint, ...]:
    out: dict[str, Endpoint] = {}
    for es in slices:
        if es.get("addressType") not in ("IPv4", "IPv6"):
            continue
        number = slice_port(es, port)
        if number is None:
            continue
        for ep in es.get("endpoints") or ():
            cond = ep.get("conditions") or {}
            healthy = cond.get("ready") is not False and cond.get("terminating") is not True
            for ip in ep.get("addresses") or ():
                e = Endpoint(host_port(ip, number), healthy)
                prev = out.get(e.address)
                out[e.address] = e if prev is None or e.healthy else prev
    return tuple(out[a] for a in sorted(out))


class PoolSpecError(ValueError):
    """An InferencePool this version cannot use (no selector, no port)."""


def pool_selector_and_port(pool: Mapping[str, Any]) -> tuple[dict[str, str], int]:
    spec = pool.get("spec") or {}
    labels = (spec.get("selector") or {}).get("matchLabels")
    if not isinstance(labels, Mapping) or not labels:
        raise PoolSpecError("spec.selector.matchLabels is missing or empty")
    ports = spec.get("targetPorts") or ()
    if not ports or not isinstance(ports[0], Mapping) or not isinstance(ports[0].get("number"), int):
        raise PoolSpecError("spec.targetPorts[0].number is missing")
    return {str(k): str(v) for k, v in labels.items()}, int(ports[0]["number"])
