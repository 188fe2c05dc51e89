"""cluster_metrics (``lb_type: cluster``): choose a whole Envoy cluster from live request metrics.

Modes (Higress names): ``LeastBusy`` (fewest in-flight requests through this ai-lb),
``LeastTotalLatency`` (lowest mean request latency), ``LeastFirstTokenLatency`` (lowest mean
time to the first generated token). The choice is written into ``cluster_header``; the core
overwrites the header and has Envoy re-evaluate the route.

Differences from Higress, on purpose:
* a cluster without samples does not win by averaging 0: it gets at most ``explore_picks``
  probe requests (per ``sample_ttl``) until a sample arrives, and is otherwise left out;
* samples older than ``sample_ttl`` seconds age out, so a recovered cluster is probed again
  and old history does not dominate forever;
* ``rate_limit`` is a share of the picks made in the last ``rate_window`` seconds (a time
  window, not the last N picks);
* TTFT is the first SSE chunk carrying generated text, not the first body chunk (vLLM's first
  chunk only carries ``"role":"assistant","content":""``). A non-streamed answer's TTFT is its
  first body byte.
A non-200 response counts as ``2 x max(mean latency of any cluster)``, as in Higress.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal, Sequence

from ..core import ClusterPick, Decision, Endpoint
from ..signals import PickShare
from ..signals.first_token import FirstToken
from .base import Policy, PolicyConfig

MODES = ("LeastBusy", "LeastTotalLatency", "LeastFirstTokenLatency")

# A JSON string field that carries generated text and is not empty. ``"content":""`` (the role
# chunk, keep-alive chunks) does not match; neither does an escaped quote inside a string.


@dataclass(frozen=True)
class ClusterMetricsConfig(PolicyConfig):
    mode: Literal["LeastBusy", "LeastTotalLatency", "LeastFirstTokenLatency"]
    service_list: tuple[str, ...]
    rate_limit: float = 1.0          # max share of recent picks one cluster may get (0..1]
    cluster_header: str = "x-higress-target-cluster"
    queue_size: int = 100            # samples kept per cluster
    # ours, not Higress's:
    rate_window: float = 10.0        # seconds of picks that rate_limit looks at
    sample_ttl: float = 60.0         # seconds a latency sample counts
    explore_picks: int = 2           # probe requests an unsampled cluster gets per sample_ttl

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if not self.service_list:
            out.append(("service_list", "must name at least one Envoy cluster"))
        elif len(set(self.service_list)) != len(self.service_list):
            out.append(("service_list", "duplicate cluster names"))
        if any(not s for s in self.service_list):
            out.append(("service_list", "empty cluster name"))
        if not 0.0 < self.rate_limit <= 1.0:
            out.append(("rate_limit", f"must be in (0, 1], got {self.rate_limit}"))
        if not self.cluster_header or self.cluster_header != self.cluster_header.lower() or self.cluster_header.startswith(":"):
            out.append(("cluster_header", "must be a lower-case, non-pseudo header name"))
        if self.queue_size < 1:
            out.append(("queue_size", "must be >= 1"))
        if self.rate_window <= 0:
            out.append(("rate_window", "must be > 0"))
        if self.sample_ttl <= 0:
            out.append(("sample_ttl", "must be > 0"))
        if self.explore_picks < 1:
            out.append(("explore_picks", "must be >= 1"))
        return out


class _Samples:
    """The last ``size`` latency samples (time, seconds) with a running sum; old ones age out."""

    __slots__ = ("q", "size", "total")

    def __init__(self, size: int) -> None:
        self.q: deque[tuple[float, float]] = deque()
        self.size = size
        self.total = 0.0

    def add(self, now: float, v: float) -> None:
        self.q.append((now, v))
        self.total += v
        if len(self.q) > self.size:
            self.total -= self.q.popleft()[1]

    def mean(self, now: float, ttl: float) -> float | None:
        q = self.q
        while q and now - q[0][0] > ttl:
            self.total -= q.popleft()[1]
        if not q:
            self.total = 0.0  # no float drift carried into the next samples
            return None
        return self.total / len(q)


class _ReqState:
    __slots__ = ("probe", "first", "ttft")

    def __init__(self, probe: bool) -> None:
        self.probe = probe       # this request was an exploration pick
        self.first = FirstToken()
        self.ttft: float | None = None


class ClusterMetrics(Policy):
    name = "cluster_metrics"
    lb_type = "cluster"
    Config = ClusterMetricsConfig

    def __init__(self, config: ClusterMetricsConfig, env) -> None:
        super().__init__(config, env)
        self.clusters = tuple(config.service_list)
        self.mode = config.mode
        self.needs_response_headers = True  # status: the non-200 penalty, precise outcomes
        self.needs_response_body = config.mode == "LeastFirstTokenLatency"
        self.inflight = {c: 0 for c in self.clusters}
        self.samples = {c: _Samples(config.queue_size) for c in self.clusters}
        self.probes: dict[str, deque[float]] = {c: deque() for c in self.clusters}
        self._clock = time.monotonic
        self.share = PickShare(config.rate_window, clock=lambda: self._clock())

    # -- choosing ------------------------------------------------------------------------
    async def pick(self, ctx, candidates: Sequence[Endpoint]) -> Decision:
        now = self._clock()
        cluster, probe = self.choose(now)
        self.inflight[cluster] += 1
        self._record_pick(now, cluster)
        if probe:
            self.probes[cluster].append(now)
        ctx.policy_state = _ReqState(probe)
        return ClusterPick(cluster=cluster, header=self.config.cluster_header)

    def choose(self, now: float) -> tuple[str, bool]:
        """The cluster for the next request, and whether it is an exploration probe."""
        if self.mode == "LeastBusy":
            ranked = self._rank({c: float(self.inflight[c]) for c in self.clusters})
            return self._rate_limited(now, ranked), False
        ttl = self.config.sample_ttl
        means: dict[str, float] = {}
        unsampled: list[str] = []
        for c in self.clusters:
            m = self.samples[c].mean(now, ttl)
            if m is None:
                unsampled.append(c)
            else:
                means[c] = m
        if unsampled:
            # Explore: an unsampled cluster with probe budget left (fewest probes first).
            budget = self.config.explore_picks
            open_ = []
            for c in unsampled:
                p = self.probes[c]
                while p and now - p[0] > ttl:
                    p.popleft()
                if len(p) < budget:
                    open_.append((len(p), c))
            if open_:
                low = min(n for n, _ in open_)
                return random.choice([c for n, c in open_ if n == low]), True
        if not means:  # nothing measured yet and every probe budget is spent: least busy
            return self._rate_limited(now, self._rank({c: float(self.inflight[c]) for c in self.clusters})), False
        return self._rate_limited(now, self._rank(means)), False

    @staticmethod
    def _rank(score: dict[str, float]) -> list[str]:
        """Clusters by score, ties in random order (a burst spreads instead of herding)."""
        items = list(score.items())
        random.shuffle(items)
        items.sort(key=lambda kv: kv[1])
        return [c for c, _ in items]

    def _rate_limited(self, now: float, ranked: list[str]) -> str:
        """The best-ranked cluster whose share of recent picks stays within ``rate_limit``."""
        if self.config.rate_limit >= 1.0 or len(ranked) < 2:
            return ranked[0]
        over = self.share.over(self.config.rate_limit, now, min_total=len(self.clusters))
        for c in ranked:
            if c not in over:
                return c
        return ranked[0]

    def _record_pick(self, now: float, cluster: str) -> None:
        if self.config.rate_limit < 1.0:
            self.share.record(cluster, now)

    # -- observing -----------------------------------------------------------------------
    def on_response_body(self, ctx, chunk: bytes, end_of_stream: bool) -> None:
        st = ctx.policy_state
        if st is not None and st.first.feed(chunk, end_of_stream):
            st.ttft = self._clock() - ctx.started

    def on_done(self, ctx) -> None:
        cluster = ctx.cluster
        if cluster not in self.inflight:
            return
        self.inflight[cluster] = max(0, self.inflight[cluster] - 1)
        st = ctx.policy_state
        if self.mode == "LeastBusy":
            return
        now = self._clock()
        status = ctx.status
        if status is None:
            return  # no response seen (reset, client gone): no sample; a probe ages out
        if status != 200:
            self.samples[cluster].add(now, self._penalty(now, now - ctx.started))
        elif self.mode == "LeastTotalLatency":
            if ctx.outcome == "complete":
                self.samples[cluster].add(now, now - ctx.started)
        elif st is not None and st.ttft is not None:
            self.samples[cluster].add(now, st.ttft)
        else:
            return
        self.probes[cluster].clear()

    def _penalty(self, now: float, observed: float) -> float:
        """Higress: a non-200 answer counts as 2 x the largest mean latency of any cluster."""
        ttl = self.config.sample_ttl
        ms = [m for m in (s.mean(now, ttl) for s in self.samples.values()) if m is not None]
        return 2.0 * max(ms) if ms else 2.0 * max(observed, 1e-3)


POLICY = ClusterMetrics
