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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Protocol

from .fields import Validator as _Validator
from .fields import tname as _tname
from .store_url import RedisURL, parse_redis_url, redact
from .yaml_text import ImplicitKey, YamlProblem, describe_key, load_yaml

LB_TYPES = ("endpoint", "cluster")
__all__ = ["LB_TYPES", "Config", "ConfigError", "EndpointsConfig", "PolicyCatalog", "RedisURL", "RouteConfig",
           "ServerConfig", "build_config", "load_config", "parse_config", "parse_redis_url", "policy_config", "redact"]


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
class EndpointsConfig:
    """Where a route's candidate endpoints come from.

    ``static`` lists ``ip:port`` strings; ``cluster`` names an Envoy cluster whose hosts
    (and their health) are read from Envoy's admin API. Both may be given: the static
    list then narrows the cluster to those addresses.
    """

    static: tuple[str, ...] = ()
    cluster: str | None = None


@dataclass(frozen=True)
class RouteConfig:
    name: str
    lb_policy: str
    lb_type: str = "endpoint"
    lb_config: Mapping[str, Any] = field(default_factory=dict)
    endpoints: EndpointsConfig = field(default_factory=EndpointsConfig)
    enabled: bool = True

    @property
    def pool(self) -> str:
        """The namespace of this route's shared state (counts, prefix keys): route and
        cluster, as Higress keys its Redis hashes."""
        return f"{self.name}|{self.endpoints.cluster or 'static'}"

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


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    store: str = "memory"
    routes: Mapping[str, RouteConfig] = field(default_factory=dict)
    plugins: tuple[str, ...] = ()
    log_level: str = "info"
    source: str | None = None


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
    v.unknown_keys("", raw, {"server", "store", "routes", "plugins", "log_level"})

    plugins = tuple(v.str_list("plugins", raw.get("plugins", [])))
    # Plugins register extra policies; load them before policy names are checked.
    for i, mod in enumerate(plugins):
        try:
            catalog.load_plugin(mod)
        except Exception as e:  # noqa: BLE001 - any import failure is a config error
            v.err(f"plugins[{i}]", f"cannot import {mod!r}: {e}")

    # A type error in one server field must not hide the range checks of the others.
    server, bad_server = v.dataclass_partial("server", raw.get("server", {}), ServerConfig)
    if server is not None:
        for fname in {"listen", "metrics_listen"} - bad_server:
            addr = getattr(server, fname)
            if not _valid_hostport(addr, allow_port_zero=True):
                v.err(f"server.{fname}", f"expected host:port, got {addr!r}")
        if "envoy_admin" not in bad_server and server.envoy_admin is not None and not server.envoy_admin.startswith(("http://", "https://")):
            v.err("server.envoy_admin", f"expected an http:// URL, got {server.envoy_admin!r}")
        for fname in ("discovery_interval", "max_body_bytes", "reload_interval"):
            if fname not in bad_server and getattr(server, fname) <= 0:
                v.err(f"server.{fname}", "must be > 0")
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

    if not raw_routes:
        v.err("routes", "no routes: every request would fall back to Envoy's native load balancing "
                        "(unknown_route); give at least one route (Envoy's route name, or \"*\")")
    if v.problems:
        raise ConfigError(v.problems)
    assert server is not None
    return Config(server=server, store=store, routes=routes, plugins=plugins, log_level=log_level, source=source)


def _route(v: "_Validator", path: str, name: str, rr: Any, server: ServerConfig | None,
           catalog: PolicyCatalog) -> RouteConfig | None:
    if not isinstance(rr, Mapping):
        v.err(path, f"expected a mapping, got {_tname(rr)}")
        return None
    v.unknown_keys(path, rr, {"lb_type", "lb_policy", "lb_config", "endpoints", "enabled"})
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

    eps = rr.get("endpoints", {}) or {}
    endpoints = EndpointsConfig()
    if not isinstance(eps, Mapping):
        v.err(f"{path}.endpoints", f"expected a mapping with 'static' and/or 'cluster', got {_tname(eps)}")
    else:
        v.unknown_keys(f"{path}.endpoints", eps, {"static", "cluster"})
        static = v.str_list(f"{path}.endpoints.static", eps.get("static", []))
        for i, a in enumerate(static):
            if not _valid_hostport(a):
                v.err(f"{path}.endpoints.static[{i}]", f"expected ip:port, got {a!r}")
        cluster = eps.get("cluster")
        if cluster is not None and not isinstance(cluster, str):
            v.err(f"{path}.endpoints.cluster", f"expected an Envoy cluster name, got {_tname(cluster)}")
        if lb_type == "endpoint" and enabled is True and not static and cluster is None:
            v.err(f"{path}.endpoints", "required for lb_type 'endpoint': give 'static' (ip:port list) and/or 'cluster' (an Envoy cluster name)")
        if cluster is not None and server is not None and server.envoy_admin is None:
            v.err(f"{path}.endpoints.cluster", "needs server.envoy_admin (the Envoy admin URL) to discover the cluster's hosts")
        endpoints = EndpointsConfig(static=tuple(static), cluster=cluster)
    if len(v.problems) > n0:
        return None
    return RouteConfig(name=name, lb_type=lb_type, lb_policy=policy, lb_config=dict(lb_config), endpoints=endpoints, enabled=enabled)


def policy_config(cls: type, raw: Mapping[str, Any]) -> Any:
    """Build a policy's typed ``lb_config`` (already validated by ``build_config``)."""
    v = _Validator()
    parsed = v.dataclass_from("lb_config", raw, cls)
    if v.problems:
        raise ConfigError(v.problems)
    return parsed


def _valid_hostport(s: Any, allow_port_zero: bool = False) -> bool:
    if not isinstance(s, str) or ":" not in s:
        return False
    host, _, port = s.rpartition(":")
    if not host or not port.isdigit():
        return False
    lo = 0 if allow_port_zero else 1
    return lo <= int(port) <= 65535
