"""The Gateway API Inference Extension endpoint-picker protocol, the parts that are data:
what the proxy tells ai-lb (route and cluster attributes, the subset hint, the endpoint
that served the request) and the destination list ai-lb answers with.

* Subset hint: ``metadata_context.filter_metadata["envoy.lb.subset_hint"]
  ["x-gateway-destination-endpoint-subset"]``, a list of ``ip:port`` (a comma-separated
  string is accepted too). Set: pick only from it; nothing eligible in it: 503. It is read
  from metadata only, never from a request header (a client could send one).
* Destination: the primary endpoint, then fallbacks, comma-separated, in the
  ``x-gateway-destination-endpoint`` header and ``envoy.lb`` metadata (same value).
  Envoy's override_host load balancer tries them in order, one per retry attempt, then
  its fallback policy.
* Served endpoint: ``metadata_context.filter_metadata["envoy.lb"]
  ["x-gateway-destination-endpoint-served"]`` on the response messages (Envoy 1.40's
  override_host writes it with ``selected_host_key``).
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterable, Sequence

from ..core import Endpoint

_RNG = random.Random()

ATTR_NAMESPACE = "envoy.filters.http.ext_proc"
ROUTE_ATTR = "xds.route_name"
CLUSTER_ATTR = "xds.cluster_name"
SUBSET_NS = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
SERVED_NS = "envoy.lb"
SERVED_KEY = "x-gateway-destination-endpoint-served"


def request_attributes(req: Any) -> tuple[str, str]:
    """(route name, cluster name) from the request attributes Envoy was told to send."""
    attrs = req.attributes.get(ATTR_NAMESPACE)
    if attrs is None:
        return "", ""
    f = attrs.fields
    r, c = f.get(ROUTE_ATTR), f.get(CLUSTER_ATTR)
    return (r.string_value if r is not None else ""), (c.string_value if c is not None else "")


def _strings(v: Any) -> list[str]:
    kind = v.WhichOneof("kind")
    if kind == "list_value":
        return [x.string_value.strip() for x in v.list_value.values if x.WhichOneof("kind") == "string_value"]
    if kind == "string_value":
        return [s.strip() for s in v.string_value.split(",")]
    return []


def subset_hint(req: Any) -> frozenset[str] | None:
    """The proxy's subset of allowed endpoints, or None when it sent none."""
    if not req.HasField("metadata_context"):
        return None
    ns = req.metadata_context.filter_metadata.get(SUBSET_NS)
    if ns is None:
        return None
    v = ns.fields.get(SUBSET_KEY)
    if v is None:
        return None
    return frozenset(s for s in _strings(v) if s)


def served_endpoint(req: Any) -> str | None:
    if not req.HasField("metadata_context"):
        return None
    ns = req.metadata_context.filter_metadata.get(SERVED_NS)
    if ns is None:
        return None
    v = ns.fields.get(SERVED_KEY)
    return v.string_value or None if v is not None else None


def in_subset(candidates: tuple[Endpoint, ...], subset: frozenset[str]) -> tuple[Endpoint, ...]:
    return tuple(e for e in candidates if e.address in subset)


FALLBACK_POOL = 32  # at most this many candidates are compared for the fallbacks


def fallbacks(primary: Endpoint, named: Iterable[Endpoint], candidates: Sequence[Endpoint], n: int,
              requests: Callable[[str], int], rng: random.Random = _RNG) -> tuple[str, ...]:
    """Fallback addresses after ``primary``: the policy's own (``Pick.fallbacks``) first,
    topped up to ``n`` with the least-loaded other candidates (fewest in flight, then
    address, so every replica agrees on ties). Among more than ``FALLBACK_POOL``
    candidates, the least loaded of ``FALLBACK_POOL`` of them from a random place: a decision's cost
    stays flat in the fleet's size (sorting 1,000 endpoints per request cost ~200 µs)."""
    first = primary.address
    out = [e.address for e in named if e.address != first] if named else []
    if len(out) >= n:
        return tuple(dict.fromkeys(out))
    pool = candidates
    if len(candidates) > FALLBACK_POOL:  # a window at a random place (one random draw, no copy of the fleet)
        i = rng.randrange(len(candidates))
        pool = (*candidates[i:i + FALLBACK_POOL], *candidates[:max(0, i + FALLBACK_POOL - len(candidates))])
    taken = (first, *out)  # at most n addresses: a tuple is searched faster than a set is built
    loads = sorted([(requests(a), a) for e in pool if (a := e.address) not in taken])  # no key function: pairs
    return tuple(dict.fromkeys(out + [a for _, a in loads[:n - len(out)]]))


def destination(d: Endpoint, named: tuple, candidates: tuple, n: int, subset: frozenset[str] | None,
                requests: Callable[[str], int]) -> str:
    """The destination value for a pick: ``primary[,fallback...]``."""
    if n <= 0 and not named:
        return d.address
    if subset is not None:
        candidates, named = in_subset(candidates, subset), in_subset(named, subset)
    rest = fallbacks(d, named, candidates, n, requests)
    return ",".join((d.address, *rest)) if rest else d.address


def note_served(req: Any, ctx: Any, load: Any, telemetry: Any) -> None:
    """Envoy's report of the endpoint that served (override_host ``selected_host_key``):
    counted, and after a retry to a fallback the in-flight count moves there."""
    if ctx is None or ctx.endpoint is None or ctx.served is not None:
        return
    served = served_endpoint(req)
    if served is not None:
        apply_served(served, ctx, load, telemetry)


def apply_served(served: str, ctx: Any, load: Any, telemetry: Any) -> None:
    """The endpoint that served (Envoy's metadata, or its access log's upstream host)."""
    if ctx is None or ctx.endpoint is None or ctx.served is not None:
        return
    ctx.served = served
    telemetry.served_report(ctx.route, served == ctx.endpoint.address)
    if served != ctx.endpoint.address and ctx.tickets:
        load.end(ctx.tickets[0])  # the picked endpoint did not get the request
        ctx.tickets = (load.begin(served, ctx.prompt_tokens), *ctx.tickets[1:])
