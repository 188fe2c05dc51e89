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

import collections.abc
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Protocol

import yaml

LB_TYPES = ("endpoint", "cluster")
_SECRET_WORDS = ("password", "secret", "token")  # never echo these values in error messages


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
    queue: QueueConfig | None = None

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
        text = p.read_text()
    except OSError as e:
        raise ConfigError([f"{p}: cannot read: {e.strerror}"]) from None
    return parse_config(text, catalog, source=str(p))


def parse_config(text: str, catalog: PolicyCatalog, source: str | None = None) -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"{source or 'config'}: invalid YAML: {e}"]) from None
    if raw is None:
        raw = {}
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

    server = v.dataclass_from("server", raw.get("server", {}), ServerConfig)
    if server is not None:
        for fname in ("listen", "metrics_listen"):
            addr = getattr(server, fname)
            if not _valid_hostport(addr, allow_port_zero=True):
                v.err(f"server.{fname}", f"expected host:port, got {addr!r}")
        if server.envoy_admin is not None and not server.envoy_admin.startswith(("http://", "https://")):
            v.err("server.envoy_admin", f"expected an http:// URL, got {server.envoy_admin!r}")
        if server.discovery_interval <= 0:
            v.err("server.discovery_interval", "must be > 0")
        if server.max_body_bytes <= 0:
            v.err("server.max_body_bytes", "must be > 0")

    store = raw.get("store", "memory")
    if not isinstance(store, str) or not (store == "memory" or store.startswith(("redis://", "rediss://", "unix://"))):
        v.err("store", f"expected 'memory' or a redis:// URL, got {store!r}")

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
        if not isinstance(name, str):  # `off:` or `1:` in YAML is a bool or int, not a name
            v.err(f"routes.{name}", f"route names must be strings; quote it: '{name}'")
            continue
        r = _route(v, f"routes.{name}", str(name), rr, server, catalog)
        if r is not None:
            routes[str(name)] = r

    if v.problems:
        raise ConfigError(v.problems)
    assert server is not None
    return Config(server=server, store=store, routes=routes, plugins=plugins, log_level=log_level, source=source)


def _route(v: "_Validator", path: str, name: str, rr: Any, server: ServerConfig | None,
           catalog: PolicyCatalog) -> RouteConfig | None:
    if not isinstance(rr, Mapping):
        v.err(path, f"expected a mapping, got {_tname(rr)}")
        return None
    v.unknown_keys(path, rr, {"lb_type", "lb_policy", "lb_config", "endpoints", "enabled", "queue"})
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
        parsed = v.dataclass_from(f"{path}.lb_config", lb_config, catalog.config_class(policy))
        if parsed is not None:
            for sub, msg in parsed.validate():  # every policy config has cross-field checks
                v.err(f"{path}.lb_config.{sub}", msg)
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
                       enabled=enabled, queue=queue)


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


def _tname(x: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean", type(None): "nothing"}.get(type(x), type(x).__name__)


class _Validator:
    """Accumulates problems; converts plain mappings into typed dataclasses."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def err(self, path: str, msg: str) -> None:
        self.problems.append(f"{path or '(top level)'}: {msg}")

    def unknown_keys(self, path: str, m: Mapping, allowed: set[str]) -> None:
        for k in m:
            if k not in allowed:
                self.err(f"{path}.{k}" if path else str(k),
                         f"unknown field; allowed: {', '.join(sorted(allowed))}" if allowed else "unknown field; this takes no fields")

    def str_list(self, path: str, x: Any) -> list[str]:
        if x is None:
            return []
        if not isinstance(x, list) or not all(isinstance(i, str) for i in x):
            self.err(path, f"expected a list of strings, got {_tname(x)}")
            return []
        return x

    def dataclass_from(self, path: str, raw: Any, cls: type) -> Any:
        """Build ``cls`` from ``raw``, checking field names and scalar types.

        Ints are accepted where floats are expected; numeric strings are accepted for
        numbers because Higress documents ``rate_limit`` as a string.
        """
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            self.err(path, f"expected a mapping, got {_tname(raw)}")
            return None
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        n0 = len(self.problems)
        # FastDeploy spells its keys with dashes (waiting-weight): the same field.
        named = {}
        for k in raw:
            f = k.replace("-", "_") if isinstance(k, str) and k not in fields else k
            if f in named:
                self.err(f"{path}.{k}", f"given twice (as {named[f]!r} and {k!r})")
                continue
            named[f] = k
        for f_name, k in named.items():
            if f_name not in fields:
                self.err(f"{path}.{k}", f"unknown field; allowed: {', '.join(sorted(fields))}" if fields
                         else "unknown field; this takes no fields")
        kwargs = {}
        for f_name, k in named.items():
            if f_name not in fields:
                continue
            val, tp = raw[k], hints[f_name]
            if dataclasses.is_dataclass(tp) and _hook(tp) is None:  # a nested block (e.g. queue.saturation); a type's own parser wins
                sub = self.dataclass_from(f"{path}.{k}", val, tp)
                if sub is not None:
                    kwargs[f_name] = sub
                continue
            hook = _hook(tp)
            if hook is not None and val is None and type(None) in typing.get_args(tp):
                kwargs[f_name] = None
                continue
            if hook is not None:  # a nested structure that validates itself (plugin lists)
                conv = hook(self, f"{path}.{k}", val)
                if conv is not None:
                    kwargs[f_name] = conv
                continue
            ok, conv = _coerce(val, tp)
            if not ok:
                shown = "<redacted>" if any(w in str(k).lower() for w in _SECRET_WORDS) else repr(val)
                self.err(f"{path}.{k}", f"expected {_describe(tp)}, got {shown}")
            else:
                kwargs[f_name] = conv
        for name, f in fields.items():
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and name not in named:
                self.err(f"{path}.{name}", "required")
        if len(self.problems) > n0:
            return None
        return cls(**kwargs)


def _hook(tp: Any) -> Any:
    """A type's own parser (``__config_parse__(validator, path, raw)``), also inside ``X | None``."""
    hook = getattr(tp, "__config_parse__", None)
    if hook is None and typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            hook = hook or getattr(arg, "__config_parse__", None)
    return hook


def _coerce(val: Any, tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, conv = _coerce(val, arg)
            if ok:
                return True, conv
        return False, None
    if origin is typing.Literal:
        return (val in typing.get_args(tp)), val
    if tp is type(None):
        return val is None, None
    if tp is bool:
        return isinstance(val, bool), val
    if tp is int:
        if isinstance(val, bool):
            return False, None
        if isinstance(val, int):
            return True, val
        if isinstance(val, str) and val.strip().lstrip("-").isdigit():
            return True, int(val)
        return False, None
    if tp is float:
        if isinstance(val, bool):
            return False, None
        if isinstance(val, (int, float)):
            return True, float(val)
        if isinstance(val, str):
            try:
                return True, float(val)
            except ValueError:
                return False, None
        return False, None
    if tp is str:
        return isinstance(val, str), val
    if origin in (dict, Mapping, collections.abc.Mapping):
        kt, vt = typing.get_args(tp) or (Any, Any)
        if not isinstance(val, Mapping):
            return False, None
        out_d = {}
        for k, x in val.items():
            ok_k, ck = _coerce(k, kt)
            ok_v, cv = _coerce(x, vt)
            if not (ok_k and ok_v):
                return False, None
            out_d[ck] = cv
        return True, out_d
    if origin in (tuple, list):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(val, list):
            return False, None
        out = []
        for item in val:
            ok, conv = _coerce(item, inner)
            if not ok:
                return False, None
            out.append(conv)
        return True, tuple(out)
    if tp is Any:
        return True, val
    return isinstance(val, tp), val


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return "a list"
    if origin in (dict, Mapping, collections.abc.Mapping):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))
