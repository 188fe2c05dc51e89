"""The waiting line: strict priority between classes, FIFO within a class, and (with a
tenant key) tenants taking turns within a class, so one tenant's burst cannot hold the
others back. Bounded: ``max_queued`` waiters per route."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict, deque


class Waiter:
    __slots__ = ("cls", "rank", "tenant", "arrived", "future", "seq", "gone", "member")

    def __init__(self, cls: str, rank: int, tenant: str, seq: int) -> None:
        self.cls = cls
        self.rank = rank
        self.tenant = tenant
        self.arrived = time.monotonic()
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.seq = seq
        self.gone = False        # left the line (granted, timed out, client gone)
        self.member: str | None = None   # its entry in a shared (Redis) line


class Line:
    def __init__(self, classes: tuple[str, ...], max_queued: int) -> None:
        self.classes = classes
        self.rank = {c: i for i, c in enumerate(classes)}
        self.max_queued = max_queued
        # per class: tenant -> deque of waiters, in the order tenants take turns
        self._lanes: list[OrderedDict[str, deque[Waiter]]] = [OrderedDict() for _ in classes]
        self._n = [0] * len(classes)
        self._seq = itertools.count()

    def __len__(self) -> int:
        return sum(self._n)

    def length(self, cls: str) -> int:
        return self._n[self.rank[cls]]

    def ahead(self, cls: str) -> int:
        """Waiters in ``cls`` or a higher class (a newcomer of ``cls`` must not pass them)."""
        return sum(self._n[: self.rank[cls] + 1])

    def push(self, cls: str, tenant: str = "") -> Waiter | None:
        """Queue a waiter, or None when the line is full."""
        if len(self) >= self.max_queued:
            return None
        r = self.rank[cls]
        w = Waiter(cls, r, tenant, next(self._seq))
        self._lanes[r].setdefault(tenant, deque()).append(w)
        self._n[r] += 1
        return w

    def head(self) -> Waiter | None:
        """The waiter to serve next (not removed)."""
        for lane in self._lanes:
            for tenant, q in lane.items():
                if q:
                    return q[0]
        return None

    def pop(self, w: Waiter) -> None:
        """Take ``w`` out of the line (it was served or gave up); its tenant goes to the
        back of its class's turn order, so the next tenant is served next."""
        if w.gone:
            return
        w.gone = True
        lane = self._lanes[w.rank]
        q = lane.get(w.tenant)
        if q is None:
            return
        try:
            q.remove(w)
        except ValueError:
            return
        self._n[w.rank] -= 1
        if q:
            lane.move_to_end(w.tenant)
        else:
            del lane[w.tenant]
