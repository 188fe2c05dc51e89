"""One route's scheduling: preselect candidates from the load index, then run the profile.

Scoring every endpoint costs O(N) per decision; at 1,000 endpoints that alone is ~1 ms in
Python. So a decision looks at most ``max_candidates`` endpoints (default 32): the least
loaded by the profile's index key (read from ``LoadIndex`` buckets in O(k)) plus a few
random others (so an endpoint whose key is stale-high is still seen now and then). With
fewer endpoints than that, every endpoint is scored, exactly as written. ``preselect:
sample`` takes ``max_candidates`` at random instead (power-of-two choices).
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from ..core import Endpoint, RequestContext
from ..signals.load import EndpointLoad, LoadView
from ..signals.load_index import IndexedSet
from .framework import Candidate, Profile, Snapshot


def local_requests(r: EndpointLoad) -> int:
    return r.requests


class Scheduler:
    def __init__(self, view: LoadView, profile: Profile, *, stale_after: float = 1.0, max_candidates: int = 32,
                 index_key: Callable[[EndpointLoad], int] = local_requests, preselect: str = "least") -> None:
        self.view = view
        self.profile = profile
        self.stale_after = stale_after
        self.max_candidates = max_candidates
        self.preselect = preselect
        # Scored whole (or sampled) below max_candidates: no index to keep up there.
        self.set = IndexedSet(view, index_key, index_above=max_candidates if preselect == "least" else 1 << 30)
        self._whole: Sequence[Endpoint] | None = None    # a set scored whole, and its load records
        self._whole_loads: list[EndpointLoad] = []

    def on_candidates(self, endpoints: Sequence[Endpoint]) -> None:
        self.set.update(endpoints)

    def close(self) -> None:
        self.set.close()

    def preselected(self, endpoints: Sequence[Endpoint], snap: Snapshot) -> Sequence[Endpoint]:
        k = self.max_candidates
        if len(endpoints) <= k:
            return endpoints
        if self.preselect == "sample":
            return random.sample(endpoints, k)
        cs = self.set.update(endpoints)
        by, index = cs.by_addr, cs.index
        explore = max(1, k // 4)
        picked: dict[str, None] = {}
        for p in self.profile.plugins:    # e.g. the holders of the request's prefix
            for a in p.prefer(snap, k // 2):
                if a in by and len(picked) < k // 2:
                    picked.setdefault(a)
        for a in index.least(k - explore):
            if len(picked) >= k - explore:
                break
            picked.setdefault(a)
        for a in index.sample(2 * explore):  # a few random others, so a stale-high key is still seen
            if len(picked) >= k:
                break
            picked.setdefault(a)
        return [by[a] for a in picked]

    def snapshot(self, ctx: RequestContext, endpoints: Sequence[Endpoint]) -> Snapshot:
        if len(endpoints) <= self.max_candidates:  # scored whole: load records looked up once per change
            if endpoints is not self._whole:
                self._whole, self._whole_loads = endpoints, [self.view.record(e.address) for e in endpoints]
            return Snapshot(ctx, self.view, endpoints, self.stale_after, loads=self._whole_loads)
        snap = Snapshot(ctx, self.view, (), self.stale_after)
        snap.set_candidates(self.preselected(endpoints, snap))
        return snap

    def run(self, ctx: RequestContext, endpoints: Sequence[Endpoint]) -> tuple[Candidate | None, Snapshot]:
        snap = self.snapshot(ctx, endpoints)
        return self.profile.run(snap), snap
