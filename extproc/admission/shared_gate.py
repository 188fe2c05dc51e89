"""A gate whose line is shared by every ai-lb replica, through Redis (``redis_line.py``).

Admission and release go through one atomic script: a request takes a slot only when
nobody waits ahead of it anywhere, and the slot is the endpoint with the fewest requests
in flight cluster-wide among those below ``saturation.max_inflight`` (so with a shared
line, the line chooses the endpoint; the route's policy picks among that one). This
replica's waiters ask for the global head every ``POLL_S``. If Redis is unavailable the
gate falls back to its own line (degraded, counted as ``local_queue``) and keeps serving.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

from ..config import QueueConfig
from ..core import Endpoint, RequestContext
from ..signals.load import LoadView
from ..state.redis_conn import RedisUnavailable
from .gate import Admitted, Gate, Queued
from .redis_line import RedisLine

POLL_S = 0.02


class SharedGate(Gate):
    def __init__(self, route: str, cfg: QueueConfig, view: LoadView, shared: RedisLine) -> None:
        super().__init__(route, cfg, view)
        self.shared = shared
        self._poller: asyncio.Task | None = None

    async def start(self) -> None:
        await self.shared.counts.start()  # the leases that give a dead replica's slots back

    def close(self) -> None:
        super().close()
        if self._poller is not None:
            self._poller.cancel()
        asyncio.get_running_loop().create_task(self.shared.counts.stop())

    async def admit(self, ctx: RequestContext, candidates: Sequence[Endpoint]):
        self._cands = candidates
        cls = self.class_of(ctx)
        try:
            return await self._admit_shared(ctx, cls, candidates)
        except RedisUnavailable:
            self._degrade(cls)   # this replica's own line decides
            return self._admit_local(ctx, cls, candidates)

    async def _admit_shared(self, ctx: RequestContext, cls: str, candidates: Sequence[Endpoint]):
        if len(self.line) >= self.cfg.max_queued:
            return self._full(cls)
        by = {e.address: e for e in candidates}
        max_wait = self.max_wait
        ep, member = await self.shared.claim("", self.line.rank[cls], max(max_wait, 0.0),
                                             self.cfg.saturation.max_inflight or 1 << 30, list(by))
        if ep is not None:
            return Admitted([by[ep]], slot=ep)
        if max_wait <= 0:
            asyncio.get_running_loop().create_task(self.shared.leave(member))
            return self._cannot_hold(cls)
        w = self._push(ctx, cls)
        if w is None:                       # filled up while we asked
            asyncio.get_running_loop().create_task(self.shared.leave(member))
            return self._full(cls)
        w.member = member
        self._members[member] = w
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name=f"queue {self.route}")
        return Queued(w, max_wait)

    async def _poll(self) -> None:
        """Ask the shared line for a slot for our waiters, oldest first, until none is left."""
        cap = self.cfg.saturation.max_inflight or 1 << 30
        try:
            while self._members:
                w = next(iter(sorted(self._members.values(), key=lambda x: (x.rank, x.arrived))))
                addrs = [e.address for e in self._cands]
                ep, head = await self.shared.claim(w.member, w.rank, self.max_wait, cap, addrs)
                if ep is None and head in self._members and head != w.member:
                    w = self._members[head]   # another of ours is the global head
                    ep, _ = await self.shared.claim(w.member, w.rank, self.max_wait, cap, addrs)
                if ep is None:
                    await asyncio.sleep(POLL_S)
                    continue
                self._members.pop(w.member, None)
                if w.future.done():          # gave up meanwhile: the slot goes back
                    self.shared.release(ep)
                    continue
                self.line.pop(w)
                w.future.set_result(Admitted([e for e in self._cands if e.address == ep] or [Endpoint(ep)], slot=ep))
        except RedisUnavailable:
            for w in self._members.values():
                self._degrade(w.cls)
            self._members.clear()            # degraded: the local rules release them
            self._poke()

    def _degrade(self, cls: str) -> None:
        self.degraded[cls] = self.degraded.get(cls, 0) + 1

    def release(self, slot: str | None) -> None:
        if slot is not None:
            self.shared.release(slot)

    def _leave(self, w) -> None:
        m = w.member
        if m is not None and self._members.pop(m, None) is not None:
            asyncio.get_running_loop().create_task(self.shared.leave(m))
