"""Receive flow control: window is given back only for bytes the application released.

One ``RecvWindow`` per stream and one for the connection. The invariant is
``available + held + unreturned == limit``: ``available`` is what the peer may still
send, ``held`` what it sent that the application has not consumed yet (buffered
messages, a partial message), ``unreturned`` what was consumed but not yet announced in a
WINDOW_UPDATE (batched until half the window is due). So the bytes buffered never exceed
``limit``, whatever the peer does: a peer that sends more is in FLOW_CONTROL_ERROR.

A gRPC message larger than the stream's window would never complete, so ``widen``
raises the limit (up to ``ceiling``) for the message being received; the extra is
absorbed again as the message is released. The connection window is never widened.
"""

from __future__ import annotations


class RecvWindow:
    __slots__ = ("initial", "limit", "ceiling", "available", "held", "unreturned")

    def __init__(self, initial: int, ceiling: int = 0) -> None:
        self.initial = self.limit = self.available = initial
        self.ceiling = max(initial, ceiling)
        self.held = 0
        self.unreturned = 0

    def receive(self, n: int) -> bool:
        """Account ``n`` received bytes; False if the peer overran the window."""
        if n > self.available:
            return False
        self.available -= n
        self.held += n
        return True

    def release(self, n: int) -> int:
        """The application consumed ``n`` bytes; returns the WINDOW_UPDATE increment due now (or 0)."""
        if n > self.held:
            n = self.held
        self.held -= n
        if self.limit > self.initial:  # shrink back a window widened for a large message
            d = min(n, self.limit - self.initial)
            self.limit -= d
            n -= d
        self.unreturned += n
        if self.unreturned and self.unreturned >= self.initial >> 1:
            return self.flush()
        return 0

    def flush(self) -> int:
        """Give back everything consumed so far; returns the increment (or 0)."""
        inc = self.unreturned
        self.unreturned = 0
        self.available += inc
        return inc

    def widen(self, need: int) -> int:
        """Make room for ``need`` more bytes if the ceiling allows; returns the increment."""
        if self.available >= need:
            return 0
        inc = self.flush()
        short = need - self.available
        if short > 0:
            grow = min(short, self.ceiling - self.limit)
            if grow > 0:
                self.limit += grow
                self.available += grow
                inc += grow
        return inc
