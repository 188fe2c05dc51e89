"""In-flight request counts per endpoint."""

from __future__ import annotations

from typing import Callable, Protocol


class InflightCounter(Protocol):
    def get(self, address: str) -> int: ...
    def inc(self, address: str) -> None: ...
    def dec(self, address: str) -> None: ...


class MemoryInflight:
    """Process-local counts. Never negative: a stray decrement is clamped, not stored,
    so a bug elsewhere cannot make an endpoint look permanently idle."""

    def __init__(self, on_change: Callable[[str, int], None] | None = None) -> None:
        self._n: dict[str, int] = {}
        self._on_change = on_change

    def get(self, address: str) -> int:
        return self._n.get(address, 0)

    def inc(self, address: str) -> None:
        n = self._n.get(address, 0) + 1
        self._n[address] = n
        if self._on_change:
            self._on_change(address, n)

    def dec(self, address: str) -> None:
        n = self._n.get(address, 0) - 1
        if n <= 0:
            self._n.pop(address, None)
            n = 0
        else:
            self._n[address] = n
        if self._on_change:
            self._on_change(address, n)

    def snapshot(self) -> dict[str, int]:
        return dict(self._n)
