"""A registered instance: FastDeploy router's ``InstanceInfo``, validated as it validates it.

The fields are FastDeploy's register.yaml / ``POST /register`` fields: ``role`` (prefill,
decode, mixed, any case, or FastDeploy's numbers 0 mixed, 1 prefill, 2 decode), ``host_ip``
(an IP address; an ``http://`` prefix is dropped), ``port`` (both required), and, kept as
metadata, ``connector_port``, ``engine_worker_queue_port``, ``transfer_protocol`` (ipc,
rdma), ``rdma_ports``, ``device_ids`` and ``metrics_port`` (default: ``port``). Ports and
ids may be numbers or numeric strings, as in FastDeploy. Unknown fields are ignored, as
FastDeploy's JSON decoding does, so newer instances register unchanged. Every problem is
reported, not only the first.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..core.endpoint import ROLES
from .k8s_objects import host_port

FD_ROLE_NUMBERS = {0: "mixed", 1: "prefill", 2: "decode"}   # FastDeploy's InstanceRole enum
PROTOCOLS = ("ipc", "rdma")
MAX_LIST = 64  # ports or device ids in one instance


@dataclass(frozen=True)
class Instance:
    role: str
    host_ip: str
    port: int
    metrics_port: int
    connector_port: int | None = None
    engine_worker_queue_port: int | None = None
    transfer_protocol: tuple[str, ...] = ()
    rdma_ports: tuple[str, ...] = ()
    device_ids: tuple[str, ...] = ()
    origin: str = "api"              # api (POST /register) | file (register.yaml)
    registered_at: float = field(default=0.0, compare=False)

    @property
    def address(self) -> str:
        """``ip:port`` as Envoy names the host (``[v6]:port``)."""
        return host_port(self.host_ip, self.port)

    def to_doc(self) -> dict[str, Any]:
        return {"role": self.role, "host_ip": self.host_ip, "port": self.port, "metrics_port": self.metrics_port,
                "connector_port": self.connector_port, "engine_worker_queue_port": self.engine_worker_queue_port,
                "transfer_protocol": list(self.transfer_protocol), "rdma_ports": list(self.rdma_ports),
                "device_ids": list(self.device_ids), "origin": self.origin, "registered_at": self.registered_at}

    def worker_info(self, healthy: bool) -> dict[str, Any]:
        """FastDeploy's ``WorkerInfo`` as ``GET /registered`` lists it, plus our health."""
        return {"url": f"http://{self.address}", "worker_type": self.role,
                "connector_port": str(self.connector_port or ""),
                "engine_worker_queue_port": str(self.engine_worker_queue_port or ""),
                "transfer_protocol": list(self.transfer_protocol), "rdma_ports": list(self.rdma_ports),
                "device_ids": list(self.device_ids), "metrics_port": str(self.metrics_port), "healthy": healthy}


def _port(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v.strip())
    return v if isinstance(v, int) and 0 < v <= 65535 else None


def _role(v: Any) -> str | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return FD_ROLE_NUMBERS.get(v)
    if isinstance(v, str) and v.strip().lower() in ROLES:
        return v.strip().lower()
    return None


def _str_list(v: Any, name: str, problems: list[str], ports: bool = False) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        v = [x for x in v.split(",") if x.strip()]
    if not isinstance(v, list) or len(v) > MAX_LIST:
        problems.append(f"{name}: expected a list (at most {MAX_LIST} items)")
        return ()
    out = []
    for i, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, (int, str)) or not str(x).strip().isdigit():
            problems.append(f"{name}[{i}]: expected an integer, got {x!r:.40}")
        elif ports and _port(x) is None:
            problems.append(f"{name}[{i}]: invalid port {x!r:.40}")
        else:
            out.append(str(x).strip())
    return tuple(out)


def parse_instance(raw: Any, origin: str = "api", now: float = 0.0) -> tuple[Instance | None, list[str]]:
    """(instance, []) or (None, every problem)."""
    if not isinstance(raw, Mapping):
        return None, ["expected a JSON object with role, host_ip and port"]
    problems: list[str] = []
    role = None
    if raw.get("role") is None:
        problems.append("role is required (prefill, decode or mixed)")
    else:
        role = _role(raw["role"])
        if role is None:
            problems.append(f"invalid role {raw['role']!r:.40}; allowed: prefill, decode, mixed")
    host = raw.get("host_ip")
    if not host:
        problems.append("host_ip is required")
    elif not isinstance(host, str):
        problems.append("invalid host_ip: expected a string")
        host = None
    else:
        host = host.strip().removeprefix("https://").removeprefix("http://").strip("[]")
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            problems.append(f"invalid host_ip {raw['host_ip']!r:.60}: expected an IP address")
            host = None
    port = None
    if raw.get("port") in (None, ""):
        problems.append("port is required")
    else:
        port = _port(raw["port"])
        if port is None:
            problems.append(f"invalid port {raw['port']!r:.20}")
    opt: dict[str, int | None] = {}
    for name in ("connector_port", "engine_worker_queue_port", "metrics_port"):
        v = raw.get(name)
        opt[name] = None if v in (None, "") else _port(v)
        if v not in (None, "") and opt[name] is None:
            problems.append(f"invalid {name} {v!r:.20}")
    protocols = _str_list_of(raw.get("transfer_protocol"), problems)
    rdma = _str_list(raw.get("rdma_ports"), "rdma_ports", problems, ports=True)
    devices = _str_list(raw.get("device_ids"), "device_ids", problems)
    if problems or role is None or host is None or port is None:
        return None, problems
    return Instance(role, host, port, opt["metrics_port"] or port, opt["connector_port"],
                    opt["engine_worker_queue_port"], protocols, rdma, devices, origin, now), []


def _str_list_of(v: Any, problems: list[str]) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        v = [x.strip() for x in v.split(",") if x.strip()]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        problems.append("transfer_protocol: expected a list of ipc, rdma")
        return ()
    bad = [x for x in v if x not in PROTOCOLS]
    if bad:
        problems.append(f"invalid transfer_protocol {bad[0]!r:.20}; allowed: ipc, rdma")
        return ()
    return tuple(v)


def from_doc(doc: Mapping[str, Any]) -> Instance | None:
    """An instance as the store holds it (None for a document that is not one)."""
    inst, problems = parse_instance(doc, str(doc.get("origin") or "api"))
    if inst is None:
        return None
    at = doc.get("registered_at")
    return dataclasses.replace(inst, registered_at=float(at) if isinstance(at, (int, float)) else 0.0)
