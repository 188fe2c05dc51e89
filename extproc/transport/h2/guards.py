"""Per-connection rate guards against control-frame and reset floods (CVE-2023-44487 and
relatives): a fixed one-second window, because an exact sliding window buys nothing
against a flood and costs a deque per connection."""

from __future__ import annotations


class RateLimit:
    __slots__ = ("limit", "count", "start")

    def __init__(self, per_second: int) -> None:
        self.limit = per_second
        self.count = 0
        self.start = float("-inf")

    def hit(self, now: float, n: int = 1) -> bool:
        """Count ``n`` events at time ``now``; True once more than the limit fell in one second."""
        if now - self.start >= 1.0:
            self.start = now
            self.count = 0
        self.count += n
        return self.count > self.limit
