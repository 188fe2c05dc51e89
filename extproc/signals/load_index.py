"""One route's endpoints bucketed by an integer load key, kept up to date as load changes.

Finding the least loaded of N endpoints by scanning them costs O(N) per decision (~100 µs
at 1,000 endpoints in Python). The index moves an endpoint between buckets when the load
view reports a change to it (O(1)), so the least loaded ones are read from the lowest
buckets: O(k) for k endpoints, whatever the fleet size. Ties are broken at random.

The key is any function of an ``EndpointLoad`` returning an int (in-flight requests, an
estimated queue, KV usage in percent, ...); it is recomputed only for the endpoint whose
load changed (and on ``refresh``, for time-dependent keys such as a scrape going stale).
"""

from __future__ import annotations

import random
from typing import Callable, Iterable, Sequence

from .load import EndpointLoad, LoadView


class _Bucket:
    """An unordered set with O(1) add, remove and random access."""

    __slots__ = ("items", "pos")

    def __init__(self) -> None:
        self.items: list[str] = []
        self.pos: dict[str, int] = {}

    def add(self, a: str) -> None:
        self.pos[a] = len(self.items)
        self.items.append(a)

    def remove(self, a: str) -> None:
        i = self.pos.pop(a)
        last = self.items.pop()
        if last != a:
            self.items[i] = last
            self.pos[last] = i


class LoadIndex:
    def __init__(self, view: LoadView, key: Callable[[EndpointLoad], int], rng: random.Random | None = None) -> None:
        self.view = view
        self.key_fn = key
        self.rng = rng or random.Random()
        self._key: dict[str, int] = {}
        self._buckets: dict[int, _Bucket] = {}
        self._keys_sorted: list[int] = []   # bucket keys present, ascending (few distinct values)
        self.members: tuple[str, ...] = ()

    # -- membership ----------------------------------------------------------------------
    def reset(self, addresses: Iterable[str]) -> None:
        """Follow exactly these endpoints (a route's candidates)."""
        new = tuple(dict.fromkeys(addresses))
        if set(new) == set(self.members):
            return
        self.close()
        self.members = new
        for a in new:
            self._place(a, self.key_fn(self.view.record(a)))
        self.view.watch(new, self._on_change)

    def close(self) -> None:
        self.view.unwatch(self.members, self._on_change)
        self.members = ()
        self._key.clear()
        self._buckets.clear()
        self._keys_sorted.clear()

    def refresh(self) -> None:
        """Recompute every key (time-dependent keys: a scrape that went stale)."""
        for a in self.members:
            self._on_change(self.view.record(a))

    # -- updates ---------------------------------------------------------------------------
    def _on_change(self, r: EndpointLoad) -> None:
        k = self.key_fn(r)
        old = self._key.get(r.address)
        if old == k:
            return
        if old is not None:
            b = self._buckets[old]
            b.remove(r.address)
            if not b.items:
                del self._buckets[old]
                self._keys_sorted.remove(old)
        self._place(r.address, k)

    def _place(self, a: str, k: int) -> None:
        b = self._buckets.get(k)
        if b is None:
            b = self._buckets[k] = _Bucket()
            ks = self._keys_sorted
            i = len(ks)
            while i and ks[i - 1] > k:   # keys are few and mostly small: insertion is cheap
                i -= 1
            ks.insert(i, k)
        b.add(a)
        self._key[a] = k

    # -- reading -------------------------------------------------------------------------------
    def key(self, address: str) -> int | None:
        return self._key.get(address)

    def least(self, k: int) -> list[str]:
        """Up to ``k`` endpoints with the lowest keys, lowest first, ties in random order."""
        out: list[str] = []
        for key in self._keys_sorted:
            items = self._buckets[key].items
            need = k - len(out)
            if len(items) <= need:
                got = list(items)
                self.rng.shuffle(got)
                out += got
            else:
                out += self.rng.sample(items, need)
            if len(out) >= k:
                break
        return out

    def sample(self, k: int) -> Sequence[str]:
        m = self.members
        return m if len(m) <= k else self.rng.sample(m, k)

    def __len__(self) -> int:
        return len(self._key)


class IndexedSet:
    """A route's candidates (as the directory hands them over: the same tuple until
    discovery changes), their lookups, and a load index over them, rebuilt only when the
    tuple changes. ``index`` is kept only for sets larger than ``index_above``: smaller
    ones are cheaper to scan whole."""

    def __init__(self, view: LoadView, key: Callable[[EndpointLoad], int], index_above: int = 0) -> None:
        self.index = LoadIndex(view, key)
        self.index_above = index_above
        self.endpoints: Sequence = ()
        self.by_addr: dict = {}
        self.addresses: list[str] = []

    def update(self, endpoints: Sequence) -> "IndexedSet":
        if endpoints is not self.endpoints:
            self.endpoints = endpoints
            self.by_addr = {e.address: e for e in endpoints}
            self.addresses = list(self.by_addr)
            if len(endpoints) > self.index_above:
                self.index.reset(self.addresses)
            else:
                self.index.close()
        return self

    @property
    def indexed(self) -> bool:
        return bool(self.index.members)

    def close(self) -> None:
        self.index.close()
