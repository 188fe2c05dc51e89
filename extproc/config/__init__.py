"""Loading and validating ai-lb's YAML configuration.

The per-route block uses Higress ``ai-load-balancer`` field names (``lb_type``,
``lb_policy``, ``lb_config``) so a Higress user's policy block moves over unchanged;
everything else (where endpoints come from, listen addresses, the state store) is ours.

Validation collects *all* problems, each prefixed with the field path, so an operator
fixes a file in one pass instead of one error per restart.

This module is a leaf: it knows no policy. Policy names and their typed ``lb_config``
classes come from a ``PolicyCatalog`` the caller passes in (``extproc.policies.registry``;
``extproc.runtime`` binds it for the usual ``load_config(path)``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Protocol

from .fields import Validator as _Validator
from .fields import tname as _tname
from .store_url import RedisURL, parse_redis_url, redact
from .yaml_text import ImplicitKey, YamlProblem, describe_key, load_yaml

from .sources import EndpointsConfig, KubernetesEndpoints, TlsConfig, parse_endpoints, parse_tls  # noqa: F401
from .sources import valid_hostport as _valid_hostport
from .registration import RegistrationConfig, parse_registration

BODY_MODES = ("buffered_partial", "buffered")  # what ai-lb asks Envoy for (mode_override) when a policy reads the body
LB_TYPES = ("endpoint", "cluster")
__all__ = ["LB_TYPES", "Config", "ConfigError", "EndpointsConfig", "PolicyCatalog", "RedisURL", "RegistrationConfig",
           "RouteConfig", "ServerConfig", "build_config", "load_config", "parse_config", "parse_redis_url", "policy_config", "redact"]


class ConfigError(Exception):
    """One or more configuration problems; ``problems`` holds one message per field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class PolicyCatalog(Protocol):
    """The policies a config may name (``extproc.policies.registry`` is one)."""

    def names(self, lb_type: str | None = None) -> list[str]: ...

    def config_class(self, name: str) -> type: ...

    def load_plugin(self, module: str) -> None: ...


@dataclass(frozen=True)
class SaturationConfig:
    """When an endpoint is full: any limit reached (0 = that limit is off)."""

    max_inflight: int = 0      # requests in flight there (cluster-wide with a Redis store)
    max_waiting: float = 0     # its scraped waiting queue, with the picks assumed since
    max_kv: float = 0          # its KV-cache usage 0..1, with assumed blocks
    max_tokens: int = 0        # prompt tokens of this instance's requests in flight there


@dataclass(frozen=True)
class QueueConfig:
    """A route's gateway queue: hold requests while every endpoint is full."""

    saturation: SaturationConfig = field(default_factory=SaturationConfig)
    max_queued: int = 100              # waiting requests per route (more: 429)
    max_wait: float = 30.0             # seconds a request may wait (then: 503)
    retry_after: int = 1               # seconds, in the 429's Retry-After
    classes: tuple[str, ...] = ("high", "normal", "low")   # strict priority, first = highest
    default_class: str = "normal"
    class_header: str = ""             # request header naming the class ...
    class_by_model: Mapping[str, str] = field(default_factory=dict)  # ... or the body's model
    tenant_header: str = ""            # fairness: tenants take turns within a class
    redis_timeout: float = 200.0       # ms per call to a Redis-shared line (then: this replica's own line)

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if self.redis_timeout <= 0:
            out.append(("redis_timeout", "must be > 0 (milliseconds)"))
        s = self.saturation
        if not (s.max_inflight or s.max_waiting or s.max_kv or s.max_tokens):
            out.append(("saturation", "set at least one of max_inflight, max_waiting, max_kv, max_tokens"))
        if min(s.max_inflight, s.max_waiting, s.max_kv, s.max_tokens) < 0 or s.max_kv > 1:
            out.append(("saturation", "limits must be >= 0 (max_kv at most 1)"))
        if self.max_queued < 0:
            out.append(("max_queued", "must be >= 0"))
        if self.max_wait <= 0:
            out.append(("max_wait", "must be > 0 seconds"))
        if self.retry_after < 0:
            out.append(("retry_after", "must be >= 0 seconds"))
        if not self.classes or len(set(self.classes)) != len(self.classes):
            out.append(("classes", "must name at least one class, each once"))
        if self.default_class not in self.classes:
            out.append(("default_class", f"must be one of the classes {list(self.classes)}"))
        for m, c in self.class_by_model.items():
            if c not in self.classes:
                out.append((f"class_by_model.{m}", f"unknown class {c!r}; allowed: {', '.join(self.classes)}"))
        for h in ("class_header", "tenant_header"):
            v = getattr(self, h)
            if v != v.lower() or v.startswith(":"):
                out.append((h, "must be a lower-case, non-pseudo header name"))
        return out


@dataclass(frozen=True)
class RouteConfig:
    name: str
    lb_policy: str
    lb_type: str = "endpoint"
    lb_config: Mapping[str, Any] = field(default_factory=dict)
    endpoints: EndpointsConfig = field(default_factory=EndpointsConfig)
    enabled: bool = True
    fallback_endpoints: int | None = None  # None: server.fallback_endpoints
    body_mode: str | None = None           # None: server.body_mode
    queue: QueueConfig | None = None

    @property
    def pool(self) -> str:
        """The namespace of this route's shared state (counts, prefix keys): route and
        cluster, as Higress keys its Redis hashes."""
        return f"{self.name}|{self.endpoints.source or 'static'}"

    def policy_key(self) -> tuple:
        """Identity of the policy instance: a reload keeps the instance (and its state)
        when this is unchanged."""
        return (self.lb_type, self.lb_policy, _freeze(self.lb_config))


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:50051"
    transport: Literal["native", "grpcio"] = "native"
    metrics_listen: str = "127.0.0.1:9464"
    envoy_admin: str | None = None
    discovery_interval: float = 1.0
    max_body_bytes: int = 8 * 1024 * 1024
    fallback_log_interval: float = 10.0
    reload_interval: float = 1.0
    #: a second, plaintext listener with only the gRPC health services (kubelet probes
    #: cannot speak TLS); None: health is served on ``listen`` only.
    health_listen: str | None = None
    tls: TlsConfig | None = None         # TLS (and mTLS with client_ca) on ``listen``
    fallback_endpoints: int = 2          # least-loaded others after the pick, for Envoy's retries
    body_mode: Literal["buffered_partial", "buffered"] = "buffered_partial"
    kubernetes_resync: float = 300.0     # seconds between full relists of each Kubernetes source
    #: how ai-lb learns that a routed request is over: ``access_log`` (Envoy's gRPC access
    #: log service tells it, off the request path: one blocking round trip per request),
    #: ``stream`` (the ext_proc stream is held open to the response's end: a second
    #: trip), ``auto`` (access_log while Envoy streams access logs to ai-lb, else stream).
    completions: Literal["auto", "access_log", "stream"] = "auto"
    completion_lease: float = 600.0      # seconds: a request whose completion never came is ended then
    workers: int = 1                     # processes serving ``listen`` (SO_REUSEPORT), state shared


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    store: str = "memory"
    routes: Mapping[str, RouteConfig] = field(default_factory=dict)
    plugins: tuple[str, ...] = ()
    log_level: str = "info"
    log_format: Literal["text", "json"] = "text"
    source: str | None = None
    registration: RegistrationConfig | None = None  # the registration API and registry (prefill/decode fleets)


def _freeze(v: Any) -> Any:
    if isinstance(v, Mapping):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


def load_config(path: str | Path, catalog: PolicyCatalog) -> Config:
    """Read and validate a config file; raises ConfigError listing every problem."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError([f"cannot read: {e.strerror}"]) from None
    return parse_config(data, catalog, source=str(p))


def parse_config(text: str | bytes, catalog: PolicyCatalog, source: str | None = None) -> Config:
    """Problems name no file (the caller prefixes it) and quote no line of the text."""
    try:
        raw = load_yaml(text)
    except YamlProblem as e:
        raise ConfigError([str(e)]) from None
    if raw is None:
        raise ConfigError(["(top level): the config is empty (a truncated or half-written file?); "
                           "it needs at least one route under 'routes'"])
    return build_config(raw, catalog, source=source)


def build_config(raw: Any, catalog: PolicyCatalog, source: str | None = None) -> Config:
    v = _Validator()
    if not isinstance(raw, Mapping):
        raise ConfigError([f"(top level): expected a mapping, got {_tname(raw)}"])
    v.unknown_keys("", raw, {"server", "store", "routes", "plugins", "log_level", "log_format", "registration"})

    plugins = tuple(v.str_list("plugins", raw.get("plugins", [])))
    # Plugins register extra policies; load them before policy names are checked.
    for i, mod in enumerate(plugins):
        try:
            catalog.load_plugin(mod)
        except Exception as e:  # noqa: BLE001 - any import failure is a config error
            v.err(f"plugins[{i}]", f"cannot import {mod!r}: {e}")

    raw_server = raw.get("server", {})
    tls = None
    if isinstance(raw_server, Mapping) and "tls" in raw_server:
        raw_server = dict(raw_server)
        tls = parse_tls(v, "server.tls", raw_server.pop("tls"))
    # A type error in one server field must not hide the range checks of the others.
    server, bad_server = v.dataclass_partial("server", raw_server, ServerConfig)
    if server is not None:
        server = dataclasses.replace(server, tls=tls)
        for fname in {"listen", "metrics_listen", "health_listen"} - bad_server:
            addr = getattr(server, fname)
            if addr is not None and not _valid_hostport(addr, allow_port_zero=True):
                v.err(f"server.{fname}", f"expected host:port, got {addr!r}")
        if "fallback_endpoints" not in bad_server and server.fallback_endpoints < 0:
            v.err("server.fallback_endpoints", "must be >= 0")
        if "kubernetes_resync" not in bad_server and server.kubernetes_resync <= 0:
            v.err("server.kubernetes_resync", "must be > 0")
        if "envoy_admin" not in bad_server and server.envoy_admin is not None and not server.envoy_admin.startswith(("http://", "https://")):
            v.err("server.envoy_admin", f"expected an http:// URL, got {server.envoy_admin!r}")
        for fname in ("discovery_interval", "max_body_bytes", "reload_interval"):
            if fname not in bad_server and getattr(server, fname) <= 0:
                v.err(f"server.{fname}", "must be > 0")
        if "completion_lease" not in bad_server and server.completion_lease <= 0:
            v.err("server.completion_lease", "must be > 0 seconds")
        if "workers" not in bad_server and not 1 <= server.workers <= 64:
            v.err("server.workers", "must be 1..64")
        if "fallback_log_interval" not in bad_server and server.fallback_log_interval < 0:
            v.err("server.fallback_log_interval", "must be >= 0")

    store = raw.get("store", "memory")
    if not isinstance(store, str):
        v.err("store", f"expected 'memory' or a Redis URL (redis://, rediss://, unix://), got {_tname(store)}")
    elif store != "memory":
        try:
            parse_redis_url(store)
        except ValueError as e:
            v.err("store", f"expected 'memory' or a Redis URL: {e}")

    log_level = raw.get("log_level", "info")
    if log_level not in ("debug", "info", "warning", "error"):
        v.err("log_level", f"unknown level {log_level!r}; allowed: debug, info, warning, error")
    log_format = raw.get("log_format", "text")
    if log_format not in ("text", "json"):
        v.err("log_format", f"unknown format {log_format!r}; allowed: text, json")

    routes: dict[str, RouteConfig] = {}
    raw_routes = raw.get("routes", {})
    if raw_routes is None:
        raw_routes = {}
    if not isinstance(raw_routes, Mapping):
        v.err("routes", f"expected a mapping of route name to policy, got {_tname(raw_routes)}")
        raw_routes = {}
    for name, rr in raw_routes.items():
        if isinstance(name, ImplicitKey):  # `off:` or `1:` in YAML is a bool or int, not a name
            v.err(f"routes.{name}", describe_key(name))
            continue
        if not isinstance(name, str):
            v.err(f"routes.{name}", f"route names must be strings, got {_tname(name)}")
            continue
        r = _route(v, f"routes.{name}", str(name), rr, server, catalog)
        if r is not None:
            routes[str(name)] = r

    registration = parse_registration(v, raw.get("registration"),
                                      [n for n, r in routes.items() if r.endpoints.registered])
    if not raw_routes:
        v.err("routes", "no routes: every request would fall back to Envoy's native load balancing "
                        "(unknown_route); give at least one route (Envoy's route name, or \"*\")")
    if v.problems:
        raise ConfigError(v.problems)
    assert server is not None
    return Config(server=server, store=store, routes=routes, plugins=plugins, log_level=log_level,
                  log_format=log_format, source=source, registration=registration)


def _route(v: "_Validator", path: str, name: str, rr: Any, server: ServerConfig | None,
           catalog: PolicyCatalog) -> RouteConfig | None:
    if not isinstance(rr, Mapping):
        v.err(path, f"expected a mapping, got {_tname(rr)}")
        return None
    v.unknown_keys(path, rr, {"lb_type", "lb_policy", "lb_config", "endpoints", "enabled", "fallback_endpoints",
                              "body_mode", "queue"})
    n0 = len(v.problems)
    lb_type = rr.get("lb_type", "endpoint")
    if lb_type not in LB_TYPES:
        v.err(f"{path}.lb_type", f"unknown lb_type {lb_type!r}; allowed: {', '.join(LB_TYPES)}")
    policy = rr.get("lb_policy")
    if policy is None:
        v.err(f"{path}.lb_policy", "required; allowed: " + ", ".join(catalog.names(lb_type if lb_type in LB_TYPES else None)))
    elif lb_type in LB_TYPES:
        allowed = catalog.names(lb_type)
        if policy not in allowed:
            v.err(f"{path}.lb_policy", f"unknown policy {policy!r} for lb_type {lb_type!r}; allowed: {', '.join(allowed) or '(none)'}")
    lb_config = rr.get("lb_config", {})
    if lb_config is None:
        lb_config = {}
    if not isinstance(lb_config, Mapping):
        v.err(f"{path}.lb_config", f"expected a mapping, got {_tname(lb_config)}")
        lb_config = {}
    elif policy is not None and lb_type in LB_TYPES and policy in catalog.names(lb_type):
        # A missing or mistyped field must not hide the range checks of the others.
        parsed, bad = v.dataclass_partial(f"{path}.lb_config", lb_config, catalog.config_class(policy))
        v.validate_partial(f"{path}.lb_config", parsed, bad)  # every policy config has cross-field checks
    enabled = rr.get("enabled", True)
    if not isinstance(enabled, bool):
        v.err(f"{path}.enabled", f"expected true or false, got {enabled!r}")

    endpoints = parse_endpoints(v, f"{path}.endpoints", rr.get("endpoints"),
                                needs_endpoints=lb_type == "endpoint" and enabled is True,
                                envoy_admin=server.envoy_admin if server is not None else None,
                                server_known=server is not None)
    fallbacks = rr.get("fallback_endpoints")
    if fallbacks is not None and (isinstance(fallbacks, bool) or not isinstance(fallbacks, int) or fallbacks < 0):
        v.err(f"{path}.fallback_endpoints", f"expected an integer >= 0, got {fallbacks!r}")
    body_mode = rr.get("body_mode")
    if body_mode is not None and body_mode not in BODY_MODES:
        v.err(f"{path}.body_mode", f"unknown body mode {body_mode!r}; allowed: {', '.join(BODY_MODES)}")
    queue = None
    if rr.get("queue") is not None:
        queue = v.dataclass_from(f"{path}.queue", rr["queue"], QueueConfig)
        if queue is not None:
            for sub, msg in queue.validate():
                v.err(f"{path}.queue.{sub}", msg)
            if lb_type != "endpoint":
                v.err(f"{path}.queue", "a queue holds requests for endpoints: lb_type must be 'endpoint'")
    if len(v.problems) > n0:
        return None
    return RouteConfig(name=name, lb_type=lb_type, lb_policy=policy, lb_config=dict(lb_config), endpoints=endpoints,
                       enabled=enabled, fallback_endpoints=fallbacks, body_mode=body_mode, queue=queue)


def policy_config(cls: type, raw: Mapping[str, Any]) -> Any:
    """Build a policy's typed ``lb_config`` (already validated by ``build_config``)."""
    v = _Validator()
    parsed = v.dataclass_from("lb_config", raw, cls)
    if v.problems:
        raise ConfigError(v.problems)
    return parsed


