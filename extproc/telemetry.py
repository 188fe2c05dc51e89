"""ai-lb's own Prometheus metrics and its rate-limited fallback log.

Label children are cached: ``labels()`` costs a lock and a dict build per call, and
these counters sit on the per-request path.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger("ai_lb.fallback")

_LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class Telemetry:
    def __init__(self, registry: CollectorRegistry | None = None, fallback_log_interval: float = 10.0) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.decisions = Counter("ai_lb_decisions", "Routing decisions by route, policy, endpoint and outcome "
                                 "(picked, rejected, fallback).", ["route", "policy", "endpoint", "outcome"], registry=r)
        self.decision_seconds = Histogram("ai_lb_decision_duration_seconds", "Time from the message that "
                                          "completed the request's input to the answer sent to Envoy.",
                                          ["route", "policy"], buckets=_LATENCY_BUCKETS, registry=r)
        self.fallbacks = Counter("ai_lb_fallbacks", "Requests handed back to Envoy's native load balancing, by reason.",
                                 ["route", "reason"], registry=r)
        self.inflight = Gauge("ai_lb_inflight_requests", "Requests in flight per endpoint through this instance.",
                              ["endpoint"], registry=r)
        self.requests_done = Counter("ai_lb_requests_done", "Finished requests that ai-lb routed, by how they ended.",
                                     ["route", "outcome"], registry=r)
        self.reloads = Counter("ai_lb_config_reloads", "Configuration reload attempts by result.", ["result"], registry=r)
        self.endpoints = Gauge("ai_lb_route_endpoints", "Known endpoints per route by health.", ["route", "state"], registry=r)
        self._children: dict[tuple, object] = {}
        self._fb_log = RateLimitedLog(fallback_log_interval)

    def _child(self, metric, *labels):
        key = (id(metric), *labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def picked(self, route: str, policy: str, endpoint: str, seconds: float) -> None:
        self._child(self.decisions, route, policy, endpoint, "picked").inc()
        self._child(self.decision_seconds, route, policy).observe(seconds)

    def rejected(self, route: str, policy: str, status: int, seconds: float) -> None:
        self._child(self.decisions, route, policy, "", "rejected").inc()
        self._child(self.decision_seconds, route, policy).observe(seconds)

    def fallback(self, route: str, policy: str, reason: str, detail: str = "") -> None:
        self._child(self.decisions, route, policy, "", "fallback").inc()
        self._child(self.fallbacks, route, reason).inc()
        self._fb_log.warn((route, reason), "fallback to native LB: route=%s policy=%s reason=%s%s",
                          route, policy or "-", reason, f" ({detail})" if detail else "")

    def set_inflight(self, endpoint: str, n: int) -> None:
        self._child(self.inflight, endpoint).set(n)

    def done(self, route: str, outcome: str) -> None:
        self._child(self.requests_done, route, outcome).inc()


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
