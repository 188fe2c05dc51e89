"""Requests routed and not yet over, when their end is learned off the request path.

With ``server.completions: access_log`` (or ``auto`` while Envoy streams access logs to
ai-lb), the ext_proc stream of a routed request ends right after ai-lb's answer: one
blocking round trip. The request is *parked* here under an id that travels with it in
Envoy's dynamic metadata (``ai_lb`` / ``id``); Envoy's gRPC access log entry for it
(``access_log.py``) carries the id back at the response's real end, with the status,
the host that actually served (after retries) and the time to its first byte.

Exactly once: whichever comes first, the access log entry, the stream's failure or the
lease, pops the id; the others find nothing. A completion that never comes (Envoy timed
out waiting for ai-lb and went native, an access log entry dropped) is ended when its
lease runs out (``server.completion_lease``), so no in-flight count leaks for longer.

Ids are ``<nonce>.<worker>.<pid>.<seq>``: with ``server.workers`` > 1, an entry that
reaches another worker is forwarded to the one that routed the request (``forward``); an
id of another ai-lb instance, or of a worker that has since been replaced, is counted
(``foreign``) and ignored.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from typing import Any, Callable

AUTO_WINDOW = 60.0   # auto mode: completions seen this recently mean the access log is wired


class Settled:
    """What the access log says of a request's end."""

    __slots__ = ("status", "served", "first_byte", "outcome")

    def __init__(self, status: int | None, served: str | None, first_byte: float | None, outcome: str) -> None:
        self.status = status          # upstream status; 0: connection failure; None: says nothing of the endpoint
        self.served = served          # ip:port Envoy sent the last attempt to
        self.first_byte = first_byte  # seconds from the request's start to the first upstream byte
        self.outcome = outcome        # complete | error | reset


class Completions:
    def __init__(self, mode: str = "auto", lease: float = 600.0, worker: int = 0, nonce: str | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = mode
        self.lease = lease
        self.worker = worker
        self.nonce = nonce or os.urandom(4).hex()
        self.prefix = f"{self.nonce}.{worker}.{os.getpid():x}."
        self.clock = clock
        self._seq = itertools.count(1)
        self._parked: dict[str, Any] = {}          # id -> RequestContext, in lease order
        self._deadline: dict[str, float] = {}
        self.streams = 0                           # access log streams open to this process
        self.last_seen = -1e18                     # monotonic time of the last completion received
        self.last_foreign = -1e18                  # ... of the last one naming another ai-lb instance
        self.on_settled: Callable[[Any, Settled | None], None] | None = None  # the processor's "done"
        self.forward: Callable[[int, str, Settled], bool] | None = None  # to another worker (multi-worker)
        self.stats = {"access_log": 0, "stream": 0, "expired": 0, "unmatched": 0, "forwarded": 0, "foreign": 0}

    @property
    def off_path(self) -> bool:
        """May a request decided now rely on the access log for its end?"""
        if self.mode == "auto":
            # Several ai-lb instances behind one Envoy: its log entries reach whichever
            # instance its streams landed on, so they cannot be relied on; hold instead.
            now = self.clock()
            return (self.streams > 0 or now - self.last_seen < AUTO_WINDOW) and now - self.last_foreign >= AUTO_WINDOW
        return self.mode == "access_log"

    def __len__(self) -> int:
        return len(self._parked)

    # -- the request path ----------------------------------------------------------------
    def park(self, ctx: Any) -> str:
        cid = f"{self.prefix}{next(self._seq):x}"
        ctx.completion = cid
        self._parked[cid] = ctx
        self._deadline[cid] = self.clock() + self.lease
        return cid

    def unpark(self, ctx: Any) -> bool:
        """Take ``ctx`` back (its stream told how it ended). False: already ended."""
        cid = ctx.completion
        if cid is None or self._parked.pop(cid, None) is None:
            return False
        del self._deadline[cid]
        self.stats["stream"] += 1
        return True

    # -- the access log ------------------------------------------------------------------
    def settle(self, cid: str, s: Settled) -> None:
        """An access log entry for request ``cid``."""
        self.last_seen = self.clock()
        if not cid.startswith(self.prefix):
            self._elsewhere(cid, s)
            return
        ctx = self._parked.pop(cid, None)
        if ctx is None:
            self.stats["unmatched"] += 1   # ended by its stream (stream mode) or its lease
            return
        del self._deadline[cid]
        self.stats["access_log"] += 1
        if self.on_settled is not None:
            self.on_settled(ctx, s)

    def _elsewhere(self, cid: str, s: Settled) -> None:
        nonce, _, rest = cid.partition(".")
        worker, _, _ = rest.partition(".")
        if (nonce == self.nonce and worker.isdigit() and int(worker) != self.worker and self.forward is not None
                and self.forward(int(worker), cid, s)):
            self.stats["forwarded"] += 1
        else:
            self.stats["foreign"] += 1
            if nonce != self.nonce:
                self.last_foreign = self.clock()

    # -- leases ----------------------------------------------------------------------------
    def expire(self) -> int:
        """End every parked request whose lease ran out (oldest first). Returns how many."""
        now = self.clock()
        n = 0
        dl = self._deadline
        while dl:
            cid = next(iter(dl))
            if dl[cid] > now:
                break
            del dl[cid]
            ctx = self._parked.pop(cid)
            n += 1
            if self.on_settled is not None:
                self.on_settled(ctx, None)
        self.stats["expired"] += n
        return n

    async def run(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            self.expire()

    def close(self) -> None:
        """Shutdown: every parked request ends now."""
        while self._parked:
            cid, ctx = self._parked.popitem()
            self._deadline.pop(cid, None)
            if self.on_settled is not None:
                self.on_settled(ctx, None)
