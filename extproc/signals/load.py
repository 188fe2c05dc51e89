"""The load view: one record per endpoint that every load-aware policy reads.

What the core knows of an endpoint's load, from three sources:

* this process's own requests: the core counts every pick exactly once (``begin``, which
  returns a ``Ticket``) and releases it exactly once (``end``), with the prompt tokens and
  KV blocks the policy expected it to cost;
* the endpoint's own metrics (``ScraperService`` hands every good sample to
  ``on_scrape``): running, waiting, KV-cache usage and geometry;
* the outcome of those requests (``end(status=...)``): upstream errors count against the
  endpoint, so a backend that fails fast does not look idle.

**Assumed load.** A scrape is a photo taken when it was requested; picks made after that
are not in it. Each pick is *assumed* on its endpoint (one more waiting request, its
tokens and blocks) until a scrape requested after the pick has been applied (the engine
then counts it itself) or the request ends. Requests that a scrape did count and that
ended since are taken off the scraped numbers. So a burst of decisions inside one scrape
interval sees its own earlier picks and spreads, instead of herding onto whichever
endpoint looked idle in an old photo.

Estimates without a fresh scrape fall back to this process's own counts. Cluster-wide
counts across ai-lb instances are the state store's (``state.counts.GlobalCounts``). With
``server.workers`` > 1 the in-flight counter is shared by the workers of one host
(``state.shared_inflight``): ``requests`` then counts every worker's requests, refreshed
on each of this worker's own changes and by ``sync`` (the gateway calls it every 20 ms).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Iterable

from ..state.inflight import LocalInflight
from .metrics import EndpointMetrics

ASSUMED, REFLECTED, ENDED = 0, 1, 2
SCRAPE_SLACK = 0.002   # a pick this close before a scrape was requested may not have reached the engine yet
DEFAULT_BLOCK_SIZE = 16  # vLLM's default KV block size, until the endpoint's own is scraped


class Ticket:
    """One routed request on one endpoint: what it was assumed to cost, and whether a
    scrape has counted it since."""

    __slots__ = ("address", "at", "tokens", "blocks", "state")

    def __init__(self, address: str, at: float, tokens: int, blocks: float) -> None:
        self.address = address
        self.at = at
        self.tokens = tokens
        self.blocks = blocks
        self.state = ASSUMED


class EndpointLoad:
    """Everything known about one endpoint's load. Read by scheduling plugins; written
    only by ``LoadView``."""

    __slots__ = ("address", "requests", "tokens", "metrics", "assumed_requests", "assumed_tokens",
                 "assumed_blocks", "ended_since_scrape", "pending", "consecutive_errors", "errors",
                 "ejected_until", "ejections")

    def __init__(self, address: str) -> None:
        self.address = address
        self.requests = 0            # requests in flight (this process's; the host's with shared workers)
        self.tokens = 0              # their prompt tokens
        self.metrics: EndpointMetrics | None = None
        self.assumed_requests = 0    # picks no applied scrape has counted yet (still in flight)
        self.assumed_tokens = 0
        self.assumed_blocks = 0.0
        self.ended_since_scrape = 0  # counted by the last scrape, ended since
        self.pending: deque[Ticket] = deque()   # tickets picked since the last applied scrape, in order
        self.consecutive_errors = 0
        self.errors = 0.0            # EWMA of the error indicator over this endpoint's outcomes
        self.ejected_until = 0.0
        self.ejections = 0

    # -- estimates (what the engine has now, as best known) -----------------------------
    def fresh(self, now: float, stale_after: float) -> EndpointMetrics | None:
        m = self.metrics
        return m if m is not None and now - m.at <= stale_after else None

    def waiting(self, now: float, stale_after: float) -> float:
        """Requests queued on the engine: scraped waiting + picks assumed since (each
        assumed pick counts as waiting until the engine reports it). Without a fresh
        scrape nothing is known of its queue: 0 (its requests count as running)."""
        m = self.fresh(now, stale_after)
        if m is None or m.waiting is None:
            return 0.0
        return m.waiting + self.assumed_requests

    def running(self, now: float, stale_after: float) -> float:
        """Requests running on the engine (scraped, less those ended since); without a
        fresh scrape, this process's own requests in flight there."""
        m = self.fresh(now, stale_after)
        if m is None or m.running is None:
            return float(self.requests)
        return max(0.0, m.running - self.ended_since_scrape)

    def total(self, now: float, stale_after: float) -> float:
        """Running + waiting, estimated; this process's own count without metrics."""
        m = self.fresh(now, stale_after)
        if m is None or (m.running is None and m.waiting is None):
            return float(self.requests)
        return max(0.0, (m.running or 0.0) + (m.waiting or 0.0) - self.ended_since_scrape) + self.assumed_requests

    def kv(self, now: float, stale_after: float) -> float | None:
        """KV-cache usage 0..1 with the blocks of assumed picks added (None: unknown)."""
        m = self.fresh(now, stale_after)
        if m is None or m.kv is None:
            return None
        extra = self.assumed_blocks / m.num_blocks if m.num_blocks else 0.0
        return min(1.0, m.kv + extra)

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until


class LoadView:
    """The records, and the core's accounting. ``watch`` lets an index follow changes."""

    def __init__(self, inflight: LocalInflight | None = None, clock: Callable[[], float] = time.monotonic,
                 eject_after: int = 3, eject_base: float = 1.0, eject_max: float = 30.0) -> None:
        self.inflight = inflight or LocalInflight()
        self.clock = clock
        self.eject_after = eject_after      # consecutive upstream errors before an endpoint is ejected
        self.eject_base = eject_base        # first ejection, seconds; doubled per repeat, up to eject_max
        self.eject_max = eject_max
        self._rec: dict[str, EndpointLoad] = {}
        self._watchers: dict[str, list[Callable[[EndpointLoad], None]]] = {}
        self.shared = getattr(self.inflight, "shared", False)

    def record(self, address: str) -> EndpointLoad:
        r = self._rec.get(address)
        if r is None:
            r = self._rec[address] = EndpointLoad(address)
        return r

    def get(self, address: str) -> EndpointLoad | None:
        return self._rec.get(address)

    # -- the core's accounting (exactly once per routed request) ------------------------
    def begin(self, address: str, tokens: int = 0) -> Ticket:
        """One more request on ``address``, expected to cost ``tokens`` prompt tokens (and
        the KV blocks they fill at the endpoint's block size)."""
        self.inflight.inc(address)
        r = self._rec.get(address) or self.record(address)
        m = r.metrics
        blocks = tokens / (m.block_size if m is not None and m.block_size else DEFAULT_BLOCK_SIZE) if tokens else 0.0
        t = Ticket(address, self.clock(), tokens, blocks)
        r.requests = self.inflight.get(address) if self.shared else r.requests + 1
        r.tokens += tokens
        r.assumed_requests += 1
        r.assumed_tokens += tokens
        r.assumed_blocks += blocks
        r.pending.append(t)
        if self._watchers:
            self._changed(r)
        return t

    def end(self, ticket: Ticket, status: int | None = None) -> None:
        """The request is over. ``status``: the upstream HTTP status if known (>= 500, or
        0 for a connection failure, counts as an error against the endpoint)."""
        if ticket.state == ENDED:
            return
        address = ticket.address
        self.inflight.dec(address)
        r = self._rec.get(address) or self.record(address)
        r.requests = self.inflight.get(address) if self.shared else max(0, r.requests - 1)
        r.tokens = max(0, r.tokens - ticket.tokens)
        if ticket.state == ASSUMED:
            self._unassume(r, ticket)
        else:
            r.ended_since_scrape += 1
        ticket.state = ENDED
        self._compact(r)
        if status is not None:
            self._outcome(r, status)
        if self._watchers:
            self._changed(r)

    @staticmethod
    def _compact(r: EndpointLoad) -> None:
        """Drop ended tickets from ``pending`` (a scrape would only skip them): from the
        left at once, and all of them when ended ones pile up behind a long request, so
        the deque stays bounded by the requests in flight even with no scrapes at all."""
        p = r.pending
        while p and p[0].state == ENDED:
            p.popleft()
        if len(p) > 2 * r.requests + 64:
            r.pending = deque(t for t in p if t.state != ENDED)

    def _unassume(self, r: EndpointLoad, t: Ticket) -> None:
        r.assumed_requests -= 1
        r.assumed_tokens -= t.tokens
        r.assumed_blocks = max(0.0, r.assumed_blocks - t.blocks)

    def _outcome(self, r: EndpointLoad, status: int) -> None:
        failed = status >= 500 or status == 0
        r.errors += 0.2 * ((1.0 if failed else 0.0) - r.errors)
        if not failed:
            r.consecutive_errors = 0
            r.ejections = 0
            return
        r.consecutive_errors += 1
        if r.consecutive_errors >= self.eject_after:
            r.ejected_until = self.clock() + min(self.eject_max, self.eject_base * 2 ** r.ejections)
            r.ejections += 1
            r.consecutive_errors = 0

    def on_scrape(self, address: str, m: EndpointMetrics, requested_at: float | None = None) -> None:
        """A scrape requested at ``requested_at`` (monotonic) arrived: picks made before
        then are counted by the engine itself now."""
        r = self.record(address)
        r.metrics = m
        boundary = (requested_at if requested_at is not None else m.at) - SCRAPE_SLACK
        p = r.pending
        while p and p[0].at < boundary:
            t = p.popleft()
            if t.state == ASSUMED:
                self._unassume(r, t)
                t.state = REFLECTED
        r.ended_since_scrape = 0
        self._changed(r)

    def retain(self, addresses: Iterable[str]) -> int:
        """Forget the records of endpoints that left the fleet (not in ``addresses``, idle,
        unwatched): the view stays bounded by the fleet, whatever the churn. Returns how
        many were dropped."""
        keep = set(addresses)
        gone = [a for a, r in self._rec.items()
                if a not in keep and r.requests == 0 and a not in self._watchers]
        for a in gone:
            del self._rec[a]
        return len(gone)

    def sync(self) -> int:
        """Shared workers: take the other workers' changes into ``requests`` (and tell the
        watchers). Returns how many records changed."""
        if not self.shared:
            return 0
        get, n = self.inflight.get, 0
        for a, r in list(self._rec.items()):
            total = get(a)
            if total != r.requests:
                r.requests = total
                n += 1
                self._changed(r)
        return n

    # -- following changes ----------------------------------------------------------------
    def watch(self, addresses: Iterable[str], fn: Callable[[EndpointLoad], None]) -> None:
        for a in addresses:
            self.record(a)
            self._watchers.setdefault(a, []).append(fn)

    def unwatch(self, addresses: Iterable[str], fn: Callable[[EndpointLoad], None]) -> None:
        for a in addresses:
            fns = self._watchers.get(a)
            if fns and fn in fns:
                fns.remove(fn)
                if not fns:
                    del self._watchers[a]

    def _changed(self, r: EndpointLoad) -> None:
        for fn in self._watchers.get(r.address, ()):
            fn(r)

    # -- reading (simple views) -------------------------------------------------------
    def requests(self, address: str) -> int:
        """Requests this process has in flight on ``address``."""
        return self.inflight.get(address)

    def tokens(self, address: str) -> int:
        """Prompt tokens of this process's requests in flight on ``address``."""
        r = self._rec.get(address)
        return r.tokens if r is not None else 0

    def metrics(self, address: str) -> EndpointMetrics | None:
        """The endpoint's last good scrape, however old (``.at`` says when)."""
        r = self._rec.get(address)
        return r.metrics if r is not None else None
