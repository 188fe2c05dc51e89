"""Where each backend's KV events come from: the ``kv_events`` block of a route's ``lb_config``.

    kv_events:
      endpoint: "tcp://{host}:5557"       # per backend: {host}, {port} (its HTTP port), {port+N}
      bind: auto                          # auto: bind for a wildcard host (*, 0.0.0.0, ::), else connect
      replay_endpoint: "tcp://{host}:5558"   # optional: the engine's replay ROUTER
      topic: ""                           # optional: the topic each engine publishes with (template)
      endpoints: {"10.0.0.7:8000": "tcp://10.0.0.7:5600"}   # per-backend overrides
      replay_endpoints: {}

Two fleets, two settings:

* every vLLM runs ``--kv-events-config '{"enable_kv_cache_events": true, "publisher":
  "zmq", "endpoint": "tcp://*:5557"}'`` (it binds): ai-lb connects to each,
  ``endpoint: "tcp://{host}:5557"``;
* every vLLM runs with ``"endpoint": "tcp://<ai-lb host>:5557"`` (it connects out): ai-lb
  binds once, ``endpoint: "tcp://0.0.0.0:5557"``, and tells the messages apart by the
  topic (``topic: "{host}:{port}"`` when each engine's topic names its address), else by
  the peer's IP address (one backend per host), else, for a port only one backend uses,
  by the port.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

_PORT = re.compile(r"\{port([+-]\d+)?\}")
_URL = re.compile(r"^(tcp)://(\[[^\]]*\]|[^:/]+):(\d+)$|^(ipc|inproc)://.+$")
WILDCARDS = ("*", "0.0.0.0", "::", "[::]")


class EndpointMap(tuple):
    """``{"host:port": "tcp://..."}`` in config, kept as sorted (address, url) pairs."""

    @classmethod
    def __config_parse__(cls, v: Any, path: str, raw: Any) -> Any:
        if not isinstance(raw, Mapping):
            v.err(path, "expected a mapping of backend host:port to an endpoint URL")
            return None
        out = []
        for k, url in raw.items():
            if not isinstance(k, str) or ":" not in k or not k.rpartition(":")[2].isdigit():
                v.err(f"{path}.{k}", "expected a backend address host:port as the key")
            elif not isinstance(url, str) or not _URL.match(resolve(url, k)):
                v.err(f"{path}.{k}", f"expected tcp://host:port (or ipc://, inproc://), got {url!r}")
            else:
                out.append((k, url))
        return cls(sorted(out))

    def get(self, address: str) -> str | None:
        for a, u in self:
            if a == address:
                return u
        return None


def resolve(template: str, address: str) -> str:
    """``template`` for the backend at ``address`` (host:port)."""
    host, _, port = address.rpartition(":")
    p = int(port) if port.isdigit() else 0

    def sub(m: re.Match) -> str:
        return str(p + int(m.group(1) or 0))

    return _PORT.sub(sub, template).replace("{host}", host)


def url_binds(url: str) -> bool:
    m = _URL.match(url)
    return bool(m and m.group(2) in WILDCARDS)


def url_host(url: str) -> str | None:
    m = _URL.match(url)
    return m.group(2).strip("[]") if m and m.group(2) else None


@dataclass(frozen=True)
class KvEventsSpec:
    endpoint: str = "tcp://{host}:5557"
    bind: bool | None = None                 # None (auto): bind for a wildcard host
    replay_endpoint: str | None = None
    topic: str = ""
    endpoints: EndpointMap = EndpointMap(())
    replay_endpoints: EndpointMap = EndpointMap(())
    mediums: tuple[str, ...] = ("GPU",)      # vLLM's "medium" of the blocks that count (CPU offload does not)
    hwm: int = 10_000                        # messages queued per socket before ZeroMQ drops (a gap)
    replay_timeout: float = 2.0
    rebuild_window: float = 10.0             # seconds a rebuilt view is not trusted alone
    stale_requests: int = 3                  # requests that stored nothing before an engine counts as silent
    max_blocks: int = 4_000_000
    max_blocks_per_endpoint: int = 1_000_000

    @classmethod
    def __config_parse__(cls, v: Any, path: str, raw: Any) -> Any:
        if isinstance(raw, Mapping) and raw.get("bind") == "auto":
            raw = {k: x for k, x in raw.items() if k != "bind"}
        spec = v.dataclass_from(path, raw, cls)
        if spec is None:
            return None
        for f, msg in spec.validate():
            v.err(f"{path}.{f}", msg)
        return spec

    def validate(self) -> list[tuple[str, str]]:
        p = []
        probe = "10.0.0.7:8000"
        if not _URL.match(resolve(self.endpoint, probe)):
            p.append(("endpoint", f"expected tcp://host:port with {{host}}, {{port}}, {{port+N}}, got {self.endpoint!r}"))
        if self.replay_endpoint is not None and not _URL.match(resolve(self.replay_endpoint, probe)):
            p.append(("replay_endpoint", f"expected tcp://host:port, got {self.replay_endpoint!r}"))
        if self.replay_endpoint is not None and url_binds(resolve(self.replay_endpoint, probe)):
            p.append(("replay_endpoint", "is the engine's ROUTER, which ai-lb connects to: name its host"))
        for f in ("hwm", "stale_requests", "max_blocks", "max_blocks_per_endpoint"):
            if getattr(self, f) < 1:
                p.append((f, "must be >= 1"))
        for f in ("replay_timeout", "rebuild_window"):
            if getattr(self, f) < 0 or (f == "replay_timeout" and self.replay_timeout == 0):
                p.append((f, "must be > 0 seconds" if f == "replay_timeout" else "must be >= 0 seconds"))
        if not self.mediums:
            p.append(("mediums", "must name at least one medium (vLLM's is GPU)"))
        return p

    def url(self, address: str) -> str:
        return resolve(self.endpoints.get(address) or self.endpoint, address)

    def replay_url(self, address: str) -> str | None:
        t = self.replay_endpoints.get(address) or self.replay_endpoint
        return resolve(t, address) if t else None

    def binds(self, url: str) -> bool:
        return url_binds(url) if self.bind is None else self.bind

    def topic_of(self, address: str) -> str | None:
        return resolve(self.topic, address) if self.topic else None
