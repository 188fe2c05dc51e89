"""ai-lb's own Prometheus metrics and its rate-limited fallback log.

The per-request metrics are plain dict counters turned into Prometheus families only
when scraped: prometheus_client's labelled metrics take a lock and validate on every
call, which cost more than the routing decision itself. Rare events (reloads, endpoint
counts) use prometheus_client directly.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

log = logging.getLogger("ai_lb.fallback")

LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class Telemetry:
    def __init__(self, registry: CollectorRegistry | None = None, fallback_log_interval: float = 10.0) -> None:
        self.registry = registry or CollectorRegistry()
        self.decisions: dict[tuple[str, str, str, str], int] = {}   # route, policy, endpoint, outcome
        self.fallbacks: dict[tuple[str, str], int] = {}             # route, reason
        self.skipped: dict[tuple[str, str], int] = {}               # route, reason (not fallbacks)
        self.requests_done: dict[tuple[str, str], int] = {}         # route, outcome
        self.inflight: dict[str, int] = {}                          # endpoint
        self.decision_seconds: dict[tuple[str, str], list] = {}     # route, policy -> [bucket counts..., sum]
        self.served: dict[tuple[str, str], int] = {}                # route, picked | fallback
        self.reloads = Counter("ai_lb_config_reloads", "Configuration reload attempts by result.", ["result"],
                               registry=self.registry)
        self.endpoints = Gauge("ai_lb_route_endpoints", "Known endpoints per route by health.", ["route", "state"],
                               registry=self.registry)
        # Set by the gateway: yields (route, policy name, policy.stats) for live policies,
        # and the state stores' event counts ((store, event) -> n).
        self.policy_stats: Callable[[], Iterable[tuple[str, str, dict]]] | None = None
        self.state_events: Callable[[], dict[tuple[str, str], int]] | None = None
        self.queues: Callable[[], Iterable[tuple[str, object]]] | None = None  # (route, admission gate)
        self.completions: Callable[[], dict[str, int]] | None = None  # how routed requests' ends were learned
        self.registry.register(_Collector(self))
        self._fb_log = RateLimitedLog(fallback_log_interval)

    # -- per-request ------------------------------------------------------------------
    def picked(self, route: str, policy: str, endpoint: str, seconds: float) -> None:
        k = (route, policy, endpoint, "picked")
        self.decisions[k] = self.decisions.get(k, 0) + 1
        self._observe(route, policy, seconds)

    def rejected(self, route: str, policy: str, status: int, seconds: float) -> None:
        k = (route, policy, "", "rejected")
        self.decisions[k] = self.decisions.get(k, 0) + 1
        self._observe(route, policy, seconds)

    def fallback(self, route: str, policy: str, reason: str, detail: str = "") -> None:
        k = (route, policy, "", "fallback")
        self.decisions[k] = self.decisions.get(k, 0) + 1
        f = (route, reason)
        self.fallbacks[f] = self.fallbacks.get(f, 0) + 1
        self._fb_log.warn(f, "fallback to native LB: route=%s policy=%s reason=%s%s",
                          route, policy or "-", reason, f" ({detail})" if detail else "")

    def skip(self, route: str, reason: str) -> None:
        """A request the route's policy has nothing to decide on (``no_body``: ``GET
        /v1/models`` on a prompt-reading route). Envoy's own LB routes it, as for a
        fallback, but it is expected traffic: no fallback count, no log line, no alert."""
        k = (route, reason)
        self.skipped[k] = self.skipped.get(k, 0) + 1

    def set_inflight(self, endpoint: str, n: int) -> None:
        self.inflight[endpoint] = n

    def served_report(self, route: str, as_picked: bool) -> None:
        k = (route, "picked" if as_picked else "fallback")
        self.served[k] = self.served.get(k, 0) + 1

    def done(self, route: str, outcome: str) -> None:
        k = (route, outcome)
        self.requests_done[k] = self.requests_done.get(k, 0) + 1

    def _observe(self, route: str, policy: str, seconds: float) -> None:
        h = self.decision_seconds.get((route, policy))
        if h is None:
            h = self.decision_seconds[(route, policy)] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]
        h[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        h[-1] += seconds

    # -- reading (tests, status) ------------------------------------------------------
    def fallback_count(self, route: str, reason: str) -> int:
        return self.fallbacks.get((route, reason), 0)

    def skipped_count(self, route: str, reason: str) -> int:
        return self.skipped.get((route, reason), 0)

    def done_count(self, route: str, outcome: str) -> int:
        return self.requests_done.get((route, outcome), 0)


class _Collector:
    """Builds the per-request metric families at scrape time (in the scraper's thread;
    ``dict(...)`` copies are atomic under the GIL)."""

    def __init__(self, t: Telemetry) -> None:
        self.t = t

    def collect(self):
        t = self.t
        yield _counters("ai_lb_decisions", "Routing decisions by route, policy, endpoint and outcome (picked, "
                        "rejected, fallback).", ["route", "policy", "endpoint", "outcome"], t.decisions)
        yield _counters("ai_lb_fallbacks", "Requests handed back to Envoy's native load balancing, by reason.",
                        ["route", "reason"], t.fallbacks)
        yield _counters("ai_lb_requests_skipped", "Requests a route's policy had nothing to decide on (no_body: a "
                        "bodyless request on a prompt-reading route), passed to Envoy's native load balancing; not "
                        "fallbacks.", ["route", "reason"], t.skipped)
        yield _counters("ai_lb_served_endpoint", "Served endpoints Envoy reported (GIE "
                        "x-gateway-destination-endpoint-served): outcome picked, or fallback (a retry went to a later "
                        "endpoint of the list).", ["route", "outcome"], t.served)
        yield _counters("ai_lb_requests_done", "Finished requests that ai-lb routed, by how they ended.",
                        ["route", "outcome"], t.requests_done)
        g = GaugeMetricFamily("ai_lb_inflight_requests", "Requests in flight per endpoint through this instance.",
                              labels=["endpoint"])
        for k, v in dict(t.inflight).items():
            g.add_metric([k], v)
        yield g
        yield _counters("ai_lb_state_events", "State store events: redis errors answered with local state "
                        "(local_pick, local_count), resynchronisations after an outage (resync).", ["store", "event"],
                        t.state_events() if t.state_events else {})
        c = CounterMetricFamily("ai_lb_policy_events", "Events counted by the policies themselves (e.g. prefix "
                                "hit/miss, endpoints without fresh metrics, missing metrics).",
                                labels=["route", "policy", "event"])
        if t.policy_stats is not None:
            for route, policy, st in list(t.policy_stats()):
                for event, v in dict(st).items():
                    c.add_metric([route, policy, event], v)
        yield c
        c = CounterMetricFamily("ai_lb_completions", "How routed requests' ends were learned: access_log (Envoy's "
                                "access log entry), stream (the ext_proc stream's end), expired (the lease ran out: "
                                "a lost completion), unmatched (an entry for a request already ended), forwarded "
                                "(to the worker that routed it), foreign (another ai-lb instance's id).",
                                labels=["how"])
        for k, v in dict(t.completions() if t.completions else {}).items():
            c.add_metric([k], v)
        yield c
        yield from _queue_families(t)
        h = HistogramMetricFamily("ai_lb_decision_duration_seconds", "Time from the message that completed the "
                                  "request's input to the answer sent to Envoy.", labels=["route", "policy"])
        for k, counts in dict(t.decision_seconds).items():
            counts = list(counts)
            buckets, acc = [], 0
            for bound, n in zip((*LATENCY_BUCKETS, float("inf")), counts[:-1]):
                acc += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), acc))
            h.add_metric(list(k), buckets, counts[-1])
        yield h


def _counters(name: str, doc: str, labels: list[str], values: dict) -> CounterMetricFamily:
    """A counter family from a dict of label tuples to counts (copied first: the request
    path may add keys while a scrape runs)."""
    c = CounterMetricFamily(name, doc, labels=labels)
    for k, v in dict(values).items():
        c.add_metric(list(k), v)
    return c


def _queue_families(t: "Telemetry"):
    """The gateway queues: waiting now, time waited, shed requests (per route and class)."""
    g = GaugeMetricFamily("ai_lb_queue_waiting", "Requests waiting in a route's queue, by class.",
                          labels=["route", "class"])
    shed = CounterMetricFamily("ai_lb_queue_shed", "Requests a route's queue answered itself: queue_full (429), "
                               "timeout (503 after max_wait), client_gone (aborted while waiting), cannot_hold (503: Envoy's "
                               "max_message_timeout leaves no time to wait).",
                               labels=["route", "class", "reason"])
    waited = HistogramMetricFamily("ai_lb_queue_wait_seconds", "Time requests spent in a route's queue.",
                                   labels=["route", "class"])
    max_wait = GaugeMetricFamily("ai_lb_queue_max_wait_seconds", "A route's queue.max_wait as applied: capped below "
                                 "Envoy's ext_proc max_message_timeout when that is shorter.", labels=["route"])
    local = CounterMetricFamily("ai_lb_queue_local", "Admissions a Redis-shared queue decided with this replica's own "
                                "line because Redis was unavailable (degraded, never stopped).", labels=["route", "class"])
    for route, gate in list(t.queues() if t.queues else ()):
        max_wait.add_metric([route], max(gate.max_wait, 0.0))
        for cls in gate.cfg.classes:
            g.add_metric([route, cls], gate.line.length(cls))
        for (cls, reason), n in dict(gate.shed).items():
            shed.add_metric([route, cls, reason], n)
        for cls, n in dict(gate.degraded).items():
            local.add_metric([route, cls], n)
        for cls, counts in dict(gate.waited).items():
            counts = list(counts)
            buckets, acc = [], 0
            for bound, n in zip((*gate.wait_buckets, float("inf")), counts[:-1]):
                acc += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), acc))
            waited.add_metric([route, cls], buckets, counts[-1])
    yield g
    yield shed
    yield waited
    yield max_wait
    yield local


class RateLimitedLog:
    """At most one line per key per interval; the next line reports how many were dropped."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[tuple, float] = {}
        self._dropped: dict[tuple, int] = {}

    def warn(self, key: tuple, fmt: str, *args) -> bool:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return False
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        if dropped:
            fmt += " [%d similar suppressed]"
            args = (*args, dropped)
        log.warning(fmt, *args)
        return True
