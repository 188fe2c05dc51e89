"""This process's in-flight requests per endpoint: the one local counter.

The core counts every routed request here exactly once when it is picked and releases it
exactly once when its stream ends, whatever the policy. Policies read it through the load
view (``extproc.signals.load``) and the memory counts store (``counts.LocalCounts``).
"""

from __future__ import annotations

from typing import Callable


class LocalInflight:
    """Never negative: a stray decrement is clamped, not stored, so a bug elsewhere cannot
    make an endpoint look permanently idle."""

    __slots__ = ("_n", "on_change")

    def __init__(self, on_change: Callable[[str, int], None] | None = None) -> None:
        self._n: dict[str, int] = {}
        self.on_change = on_change

    def get(self, address: str) -> int:
        return self._n.get(address, 0)

    def inc(self, address: str) -> None:
        n = self._n.get(address, 0) + 1
        self._n[address] = n
        if self.on_change:
            self.on_change(address, n)

    def dec(self, address: str) -> None:
        n = self._n.get(address, 0) - 1
        if n <= 0:
            self._n.pop(address, None)
            n = 0
        else:
            self._n[address] = n
        if self.on_change:
            self.on_change(address, n)

    def snapshot(self) -> dict[str, int]:
        return dict(self._n)
