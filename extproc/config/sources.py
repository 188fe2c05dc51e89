"""The parts of the config that name things outside ai-lb: where a route's endpoints come
from (``endpoints:``) and the listener's certificate files (``server.tls``). A leaf below
``extproc.config``, which re-exports these types; the parsers take its validator.

``endpoints`` may be omitted on an ``lb_type: endpoint`` route when ``server.envoy_admin``
is set: the route then reads the hosts of whichever Envoy cluster Envoy routes the request
to (the ``xds.cluster_name`` attribute Envoy sends with it), as Higress's own plugin does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

ENDPOINT_KEYS = {"static", "cluster", "kubernetes", "registered", "roles"}
K8S_KEYS = {"namespace", "inference_pool", "selector", "service", "port"}
ROLES = ("prefill", "decode", "mixed")  # extproc.core.endpoint.ROLES (config is the leaf: no import)
REGISTERED = "registry:instances"       # the directory's name for the registered instances


@dataclass(frozen=True)
class KubernetesEndpoints:
    """Endpoints discovered from the Kubernetes API: exactly one of an InferencePool
    (``inference.networking.k8s.io/v1``: its selector and target port), pods by label
    selector (``port`` required), or the EndpointSlices of a Service (``port``: a number
    or a port name; optional when the Service has one port)."""

    namespace: str | None = None  # None: the client's namespace (in a pod: its own)
    inference_pool: str | None = None
    selector: tuple[tuple[str, str], ...] = ()
    service: str | None = None
    port: int | str | None = None

    @property
    def key(self) -> str:
        """The directory's name for this source (what ``cluster`` is for Envoy's)."""
        ns = self.namespace or ""
        if self.inference_pool:
            return f"k8s:{ns}/inferencepools/{self.inference_pool}"
        if self.service:
            return f"k8s:{ns}/services/{self.service}:{self.port or ''}"
        return f"k8s:{ns}/pods/{','.join(f'{k}={v}' for k, v in self.selector)}:{self.port}"


@dataclass(frozen=True)
class EndpointsConfig:
    """Where a route's candidate endpoints come from.

    ``static`` lists ``ip:port`` strings; ``cluster`` names an Envoy cluster whose hosts
    (and their health) are read from Envoy's admin API; ``kubernetes`` watches the API
    server; ``registered`` reads the instances registered with ai-lb (``POST /register``);
    ``route_cluster`` (no ``endpoints:`` given) reads the Envoy cluster of each request. A
    static list given with a discovered set narrows it to those addresses. ``roles``
    (address -> prefill | decode | mixed) labels endpoints for prefill/decode routes,
    over what their source says; a labelled address no source names is added as a
    static endpoint.
    """

    static: tuple[str, ...] = ()
    cluster: str | None = None
    kubernetes: KubernetesEndpoints | None = None
    route_cluster: bool = False
    registered: bool = False
    roles: tuple[tuple[str, str], ...] = ()

    @property
    def source(self) -> str | None:
        """The discovered set this route reads (None: static only, or per request)."""
        if self.kubernetes is not None:
            return self.kubernetes.key
        return REGISTERED if self.registered else self.cluster


@dataclass(frozen=True)
class TlsConfig:
    cert: str
    key: str
    client_ca: str | None = None


def valid_hostport(s: Any, allow_port_zero: bool = False) -> bool:
    if not isinstance(s, str) or ":" not in s:
        return False
    host, _, port = s.rpartition(":")
    if not host or not port.isdigit():
        return False
    return (0 if allow_port_zero else 1) <= int(port) <= 65535


def _tname(x: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", int: "a number", bool: "a boolean"}.get(
        type(x), type(x).__name__)


def parse_tls(v: Any, path: str, raw: Any) -> TlsConfig | None:
    if raw is None:
        return None
    tls = v.dataclass_from(path, raw, TlsConfig)
    if tls is not None:
        for f in ("cert", "key", "client_ca"):
            if getattr(tls, f) == "":
                v.err(f"{path}.{f}", "must not be empty")
    return tls


def parse_endpoints(v: Any, path: str, eps: Any, needs_endpoints: bool, envoy_admin: str | None,
                    server_known: bool) -> EndpointsConfig:
    """``routes.X.endpoints`` (``eps`` None: not given). Problems go to ``v``."""
    if eps is None or eps == {}:
        if not needs_endpoints:
            return EndpointsConfig()
        if envoy_admin is None and server_known:
            v.err(path, "required for lb_type 'endpoint' unless server.envoy_admin is set (then the route's own "
                        "Envoy cluster is discovered): give 'static' (ip:port list), 'cluster' (an Envoy cluster "
                        "name) or 'kubernetes'")
        return EndpointsConfig(route_cluster=True)
    if not isinstance(eps, Mapping):
        v.err(path, f"expected a mapping with 'static', 'cluster' and/or 'kubernetes', got {_tname(eps)}")
        return EndpointsConfig()
    v.unknown_keys(path, eps, ENDPOINT_KEYS)
    static = v.str_list(f"{path}.static", eps.get("static", []))
    for i, a in enumerate(static):
        if not valid_hostport(a):
            v.err(f"{path}.static[{i}]", f"expected ip:port, got {a!r}")
    cluster = eps.get("cluster")
    if cluster is not None and not isinstance(cluster, str):
        v.err(f"{path}.cluster", f"expected an Envoy cluster name, got {_tname(cluster)}")
        cluster = None
    if cluster is not None and envoy_admin is None and server_known:
        v.err(f"{path}.cluster", "needs server.envoy_admin (the Envoy admin URL) to discover the cluster's hosts")
    k8s = _kubernetes(v, f"{path}.kubernetes", eps["kubernetes"]) if "kubernetes" in eps else None
    registered = eps.get("registered", False)
    if not isinstance(registered, bool):
        v.err(f"{path}.registered", f"expected true or false, got {_tname(registered)}")
        registered = False
    given = [k for k, on in (("cluster", cluster is not None), ("kubernetes", "kubernetes" in eps),
                             ("registered", registered)) if on]
    if len(given) > 1:
        v.err(path, f"give one of 'cluster', 'kubernetes' or 'registered', not {' and '.join(given)}")
    roles = _roles(v, f"{path}.roles", eps.get("roles"))
    if needs_endpoints and not static and not given and not roles:
        v.err(path, "names no endpoints: give 'static', 'cluster', 'kubernetes', 'registered' or 'roles' (or leave "
                    "'endpoints' out to use the route's own Envoy cluster)")
    return EndpointsConfig(static=tuple(static), cluster=cluster, kubernetes=k8s, registered=registered, roles=roles)


def _roles(v: Any, path: str, raw: Any) -> tuple[tuple[str, str], ...]:
    """``roles: {prefill: [ip:port, ...], decode: [...], mixed: [...]}`` -> (address, role) pairs."""
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        v.err(path, f"expected a mapping of role ({', '.join(ROLES)}) to a list of ip:port, got {_tname(raw)}")
        return ()
    out: dict[str, str] = {}
    for role, addrs in raw.items():
        if role not in ROLES:
            v.err(f"{path}.{role}", f"unknown role; allowed: {', '.join(ROLES)}")
            continue
        for i, a in enumerate(v.str_list(f"{path}.{role}", addrs)):
            if not valid_hostport(a):
                v.err(f"{path}.{role}[{i}]", f"expected ip:port, got {a!r}")
            elif a in out and out[a] != role:
                v.err(f"{path}.{role}[{i}]", f"{a} is already listed as {out[a]}")
            else:
                out[a] = role
    return tuple(out.items())


def _kubernetes(v: Any, path: str, raw: Any) -> KubernetesEndpoints | None:
    if not isinstance(raw, Mapping):
        v.err(path, f"expected a mapping with one of inference_pool, selector, service, got {_tname(raw)}")
        return None
    n0 = len(v.problems)
    v.unknown_keys(path, raw, K8S_KEYS)
    kinds = [k for k in ("inference_pool", "selector", "service") if raw.get(k) is not None]
    if len(kinds) != 1:
        v.err(path, "give exactly one of inference_pool, selector, service" + (f" (got {', '.join(kinds)})" if kinds else ""))
    for f in ("namespace", "inference_pool", "service"):
        if raw.get(f) is not None and (not isinstance(raw[f], str) or not raw[f]):
            v.err(f"{path}.{f}", f"expected a name, got {raw[f]!r}")
    selector = raw.get("selector")
    if selector is not None and (not isinstance(selector, Mapping) or not selector
                                 or not all(isinstance(k, str) and isinstance(x, (str, int, bool)) for k, x in selector.items())):
        v.err(f"{path}.selector", "expected a non-empty mapping of label to value (matchLabels)")
        selector = None
    port = raw.get("port")
    if port is not None:
        if isinstance(port, bool) or not isinstance(port, (int, str)) or (isinstance(port, int) and not 1 <= port <= 65535):
            v.err(f"{path}.port", f"expected a port number (1-65535) or a port name, got {port!r}")
        elif isinstance(port, str) and raw.get("service") is None:
            v.err(f"{path}.port", "a port name works with 'service' only; give a number")
    elif raw.get("selector") is not None:
        v.err(f"{path}.port", "required with 'selector' (the pods' serving port)")
    if len(v.problems) > n0:
        return None
    sel = tuple(sorted((str(k), str(x).lower() if isinstance(x, bool) else str(x)) for k, x in (selector or {}).items()))
    return KubernetesEndpoints(namespace=raw.get("namespace"), inference_pool=raw.get("inference_pool"), selector=sel,
                               service=raw.get("service"), port=port)
