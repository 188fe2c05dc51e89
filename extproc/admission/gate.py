"""A route's gate: admit at once while an endpoint has room and nobody waits ahead,
otherwise wait in line; release the line to the first endpoint that frees up.

The core calls ``admit`` before the policy picks. ``Admitted`` carries the candidates
with room (the policy chooses among them); ``Queued`` is held by the core (it extends
Envoy's message timeout, then awaits ``wait``); ``Rejected`` is a 429 (line full) or a
503 (waited past ``max_wait``), both with OpenAI's error shape. Releases are serialised:
a waiter granted a slot must be counted (``settled``, right after the pick) before the
next one is granted, so one free slot is never given twice. The line is re-examined on
every load change of the route's endpoints (a request ends, a scrape arrives).

With a Redis store the line is shared by every replica: ``shared_gate.SharedGate``.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from dataclasses import dataclass
from typing import Sequence

from ..config import QueueConfig
from ..core import BodyError, Endpoint, RequestContext
from ..signals.load import EndpointLoad, LoadView
from .queue import Line, Waiter
from .saturation import Saturation

WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A held request's answer is due this long before Envoy gives up on the message (and,
# with failure_mode_allow, sends the request on unrouted): Envoy is told max_wait + this.
HOLD_MARGIN_S = 1.0

log = logging.getLogger("ai_lb.queue")


@dataclass(slots=True)
class Admitted:
    candidates: Sequence[Endpoint]
    slot: str | None = None     # a shared line's slot (an endpoint), released with ``release``


@dataclass(slots=True)
class Rejected:
    status: int
    message: str
    retry_after: int | None = None


@dataclass(slots=True)
class Queued:
    waiter: Waiter
    max_wait: float


class Gate:
    wait_buckets = WAIT_BUCKETS

    def __init__(self, route: str, cfg: QueueConfig, view: LoadView) -> None:
        self.route = route
        self.cfg = cfg
        self.view = view
        self._members: dict[str, Waiter] = {}    # waiters a shared line decides for (SharedGate)
        self.sat = Saturation(cfg.saturation)
        self.line = Line(cfg.classes, cfg.max_queued)
        self._cands: Sequence[Endpoint] = ()
        self._watched: tuple[str, ...] = ()
        self._granted: Waiter | None = None
        self.hold_limit: float | None = None   # Envoy's longest wait for one ext_proc answer, when known
        # (class) -> counts, for the metrics
        self.shed: dict[tuple[str, str], int] = {}             # (class, reason) -> n
        self.degraded: dict[str, int] = {}                     # class -> decisions made locally (shared line down)
        self.waited: dict[str, list] = {}                      # class -> [bucket counts..., sum]

    # -- lifecycle -----------------------------------------------------------------------
    def on_candidates(self, endpoints: Sequence[Endpoint]) -> None:
        self._cands = endpoints
        addrs = tuple(e.address for e in endpoints)
        if addrs != self._watched:
            self.view.unwatch(self._watched, self._on_change)
            self.view.watch(addrs, self._on_change)
            self._watched = addrs
        self._poke()

    async def start(self) -> None:
        pass

    @property
    def max_wait(self) -> float:
        """``queue.max_wait``, capped so that a held request is answered before Envoy stops
        waiting for the message (its ext_proc ``max_message_timeout``, less the margin)."""
        lim = self.hold_limit
        return self.cfg.max_wait if lim is None else min(self.cfg.max_wait, lim - HOLD_MARGIN_S)

    def set_hold_limit(self, limit: float | None) -> None:
        """Envoy's longest wait for one ext_proc answer (discovered from its admin API)."""
        if limit == self.hold_limit:
            return
        self.hold_limit = limit
        mw = self.max_wait
        if mw <= 0:
            log.warning("route %r: Envoy waits at most %g s for an ext_proc answer, too short to hold a request "
                        "(queue.max_wait %g s + %g s); requests that would wait are answered 503. Set the ext_proc "
                        "filter's max_message_timeout above max_wait + %g s", self.route, limit, self.cfg.max_wait,
                        HOLD_MARGIN_S, HOLD_MARGIN_S)
        elif mw < self.cfg.max_wait:
            log.warning("route %r: queue.max_wait %g s is capped at %g s: Envoy's ext_proc max_message_timeout is "
                        "%g s, and a held request must be answered before Envoy stops waiting and sends it on "
                        "unrouted", self.route, self.cfg.max_wait, mw, limit)

    def close(self) -> None:
        self.view.unwatch(self._watched, self._on_change)
        self._watched = ()
        while True:   # nobody is left waiting for a gate that is gone
            w = self.line.head()
            if w is None:
                break
            self.line.pop(w)
            if not w.future.done():
                w.future.set_result(Rejected(503, "the route's queue was removed by a reload; retry"))

    # -- the request path ----------------------------------------------------------------------
    def class_of(self, ctx: RequestContext) -> str:
        c = self.cfg
        if c.class_header:
            v = ctx.headers.get(c.class_header)
            if v in self.line.rank:
                return v
        if c.class_by_model:
            try:
                m = ctx.model
            except BodyError:
                m = None
            if m in c.class_by_model:
                return c.class_by_model[m]
        return c.default_class

    def roomy(self, candidates: Sequence[Endpoint]) -> list[Endpoint]:
        now = time.monotonic()
        rec, room = self.view.record, self.sat.room
        return [e for e in candidates if room(rec(e.address), now)]

    async def admit(self, ctx: RequestContext, candidates: Sequence[Endpoint]) -> Admitted | Queued | Rejected:
        self._cands = candidates
        return self._admit_local(ctx, self.class_of(ctx), candidates)

    def _admit_local(self, ctx: RequestContext, cls: str, candidates: Sequence[Endpoint]):
        if self._granted is None and not self.line.ahead(cls):
            roomy = self.roomy(candidates)
            if roomy:
                return Admitted(roomy)
        max_wait = self.max_wait
        if max_wait <= 0:
            return self._cannot_hold(cls)
        w = self._push(ctx, cls)
        if w is None:
            return self._full(cls)
        self._poke()
        return Queued(w, max_wait)

    def _push(self, ctx: RequestContext, cls: str) -> Waiter | None:
        tenant = ctx.headers.get(self.cfg.tenant_header, "") if self.cfg.tenant_header else ""
        return self.line.push(cls, tenant)

    def _full(self, cls: str) -> Rejected:
        self._count(cls, "queue_full")
        return Rejected(429, f"all endpoints of route {self.route!r} are busy and {len(self.line)} requests "
                             "are waiting; retry later", self.cfg.retry_after)

    def _cannot_hold(self, cls: str) -> Rejected:
        self._count(cls, "cannot_hold")
        return Rejected(503, f"all endpoints of route {self.route!r} are busy and the gateway cannot hold the "
                             "request (Envoy's ext_proc max_message_timeout is too short); retry later",
                        self.cfg.retry_after)

    def release(self, slot: str | None) -> None:
        """A request admitted with a slot is over (exactly once). Local slots need nothing:
        the load view counts every request; a shared line's are given back there."""

    async def wait(self, q: Queued) -> Admitted | Rejected:
        w = q.waiter
        try:
            async with asyncio.timeout(max(0.0, q.max_wait - (time.monotonic() - w.arrived))):
                got = await w.future
        except TimeoutError:
            f = w.future
            if f.done() and not f.cancelled():  # granted in the same instant as the deadline: use it
                self._observe(w)
                return f.result()
            self.line.pop(w)
            self._leave(w)
            self._count(w.cls, "timeout")
            self._observe(w)
            return Rejected(503, f"no endpoint of route {self.route!r} freed up within {q.max_wait:g} s; "
                                 "retry later", self.cfg.retry_after)
        except asyncio.CancelledError:  # the client went away (Envoy reset the stream)
            self.line.pop(w)
            self._leave(w)
            self._count(w.cls, "client_gone")
            self._settle(w)             # a grant it received but could not use goes to the next
            raise
        self._observe(w)
        return got

    def settled(self, w: Waiter | None) -> None:
        """The request that ``w`` granted has been counted (or decided otherwise). Called
        for every waiter whatever became of it: one still in the line leaves it."""
        if w is not None:
            if not w.gone:
                self.line.pop(w)
                self._leave(w)
            self._settle(w)

    # -- releasing ---------------------------------------------------------------------
    def _leave(self, w: Waiter) -> None:
        """``w`` gave up (the shared line's entry is dropped in SharedGate)."""

    def _settle(self, w: Waiter) -> None:
        if self._granted is w:
            self._granted = None
            self._poke()

    def _on_change(self, r: EndpointLoad) -> None:
        if len(self.line) and self._granted is None:
            self._poke()

    def _poke(self) -> None:
        while self._granted is None:
            w = self.line.head()
            if w is None or w.member in self._members:
                return  # nobody, or the shared line decides for this one
            roomy = self.roomy(self._cands)
            if not roomy:
                return
            self.line.pop(w)
            if w.future.done():          # timed out or cancelled in the meantime
                continue
            self._granted = w
            w.future.set_result(Admitted(roomy))

    # -- metrics ---------------------------------------------------------------------------
    def _count(self, cls: str, reason: str) -> None:
        k = (cls, reason)
        self.shed[k] = self.shed.get(k, 0) + 1

    def _observe(self, w: Waiter) -> None:
        h = self.waited.get(w.cls)
        if h is None:
            h = self.waited[w.cls] = [0] * (len(WAIT_BUCKETS) + 1) + [0.0]
        s = time.monotonic() - w.arrived
        h[bisect.bisect_left(WAIT_BUCKETS, s)] += 1
        h[-1] += s
