"""In-flight counts shared by the worker processes of one ai-lb (``server.workers`` > 1).

A table in anonymous shared memory, mapped before the workers are forked: one row per
worker, and **each worker writes only its own row**; a reader sums the rows. No lock is
taken anywhere: a row has one writer, and 8-byte aligned stores and loads are atomic on
the platforms ai-lb runs on, so a reader sees each count either before or after a change.

A row is a small open-addressing hash table of ``slots`` entries (key, count), keyed by a
64-bit hash of the endpoint address (0 = empty), written by its worker alone; an entry,
once made, never moves, so readers cache where an address sits in each row. Row headers
carry the worker's generation (bumped when a worker is replaced and its row cleared:
readers drop their cached positions), its metrics port (for the supervisor) and how many
client connections it serves (workers even them out: ``server._join_workers``).

``SharedInflight`` has ``LocalInflight``'s interface: ``get`` is the host-wide count
(every worker's requests), ``own`` this worker's.
"""

from __future__ import annotations

import mmap
from typing import Callable

import xxhash

HEADER = 8                  # int64 fields at the start of each row
GEN, METRICS_PORT, PID, CONNS = 0, 1, 2, 3
_full_warned = False


class SharedTable:
    def __init__(self, workers: int, slots: int = 16384) -> None:
        self.workers = workers
        self.slots = slots
        self.row = HEADER + 2 * slots          # int64 per row
        self.mm = mmap.mmap(-1, 8 * self.row * workers)   # MAP_SHARED | MAP_ANONYMOUS: survives fork
        self.v = memoryview(self.mm).cast("q")

    def header(self, worker: int, field: int) -> int:
        return self.v[worker * self.row + field]

    def set_header(self, worker: int, field: int, value: int) -> None:
        self.v[worker * self.row + field] = value

    def clear_row(self, worker: int) -> None:
        """Before a replacement worker starts: its predecessor's requests are gone."""
        base = worker * self.row
        gen = self.v[base + GEN]
        self.v[base:base + self.row] = memoryview(bytes(8 * self.row)).cast("q")
        self.v[base + GEN] = gen + 1

    def find(self, worker: int, key: int, claim: bool) -> int:
        """Index of ``key``'s count in ``worker``'s row (claiming a free entry if asked), -1 if absent."""
        v, slots = self.v, self.slots
        base = worker * self.row + HEADER
        i = key % slots
        for _ in range(slots):
            k = v[base + 2 * i]
            if k == key:
                return base + 2 * i + 1
            if k == 0:
                if not claim:
                    return -1
                v[base + 2 * i + 1] = 0
                v[base + 2 * i] = key
                return base + 2 * i + 1
            i = (i + 1) % slots
        return -1


def _key(address: str) -> int:
    return (xxhash.xxh3_64_intdigest(address.encode()) >> 1) | 1   # non-zero, fits a signed int64


class SharedInflight:
    """Never negative (a stray decrement is clamped), like ``LocalInflight``."""

    shared = True

    def __init__(self, table: SharedTable, worker: int, on_change: Callable[[str, int], None] | None = None) -> None:
        self.table = table
        self.worker = worker
        self.on_change = on_change
        self._own: dict[str, int] = {}               # address -> index of this worker's count
        self._seen: dict[str, list[int]] = {}        # address -> index per row (-1: not there yet)
        self._gens = [table.header(w, GEN) for w in range(table.workers)]
        self._local: dict[str, int] = {}             # addresses that found no room in the row

    def _mine(self, address: str) -> int:
        i = self._own.get(address)
        if i is None:
            i = self.table.find(self.worker, _key(address), claim=True)
            if i < 0:
                _warn_full()
                return -1
            self._own[address] = i
        return i

    def own(self, address: str) -> int:
        i = self._mine(address)
        return self.table.v[i] if i >= 0 else self._local.get(address, 0)

    def get(self, address: str) -> int:
        t = self.table
        v = t.v
        idx = self._seen.get(address)
        if idx is None or -1 in idx or self._stale():
            key = _key(address)
            idx = self._seen[address] = [t.find(w, key, claim=False) for w in range(t.workers)]
        total = self._local.get(address, 0)
        for i in idx:
            if i >= 0:
                total += v[i]
        return total

    def _stale(self) -> bool:
        """A worker was replaced (its row cleared): forget every cached position."""
        t = self.table
        for w in range(t.workers):
            g = t.header(w, GEN)
            if g != self._gens[w]:
                self._gens = [t.header(x, GEN) for x in range(t.workers)]
                self._seen.clear()
                return True
        return False

    def inc(self, address: str) -> None:
        i = self._mine(address)
        if i >= 0:
            v = self.table.v
            n = v[i] + 1
            v[i] = n
        else:
            n = self._local[address] = self._local.get(address, 0) + 1
        if self.on_change:
            self.on_change(address, n)

    def dec(self, address: str) -> None:
        i = self._mine(address)
        if i >= 0:
            v = self.table.v
            n = max(0, v[i] - 1)
            v[i] = n
        else:
            n = max(0, self._local.get(address, 0) - 1)
            self._local[address] = n
        if self.on_change:
            self.on_change(address, n)

    def snapshot(self) -> dict[str, int]:
        return {a: self.get(a) for a in (*self._own, *self._local)}


def _warn_full() -> None:
    global _full_warned
    if not _full_warned:
        _full_warned = True
        import logging  # noqa: PLC0415

        logging.getLogger("ai_lb.state").warning(
            "shared in-flight table full: new endpoints are counted by this worker alone")
