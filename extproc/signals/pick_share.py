"""The share of recent picks each endpoint (or cluster) got: Higress's ``rate_limit``.

One sliding time window of picks (Higress counts the last 100 picks, with no notion of
time; a window in seconds means an idle minute does not keep an old burst's shares).
``over(limit)`` names the keys that would exceed ``limit`` with one more pick.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable


class PickShare:
    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._picks: deque[tuple[float, str]] = deque()
        self._counts: dict[str, int] = {}

    def record(self, key: str, now: float | None = None) -> None:
        now = self._clock() if now is None else now
        self._picks.append((now, key))
        self._counts[key] = self._counts.get(key, 0) + 1
        self._expire(now)

    def over(self, limit: float, now: float | None = None, min_total: int = 0) -> set[str]:
        """Keys whose share of the window's picks, counting one more pick for them, would
        exceed ``limit``; none while the window holds fewer than ``min_total`` picks (too
        few for a share to mean anything)."""
        if limit >= 1.0:
            return set()
        self._expire(self._clock() if now is None else now)
        total = len(self._picks) + 1
        if total - 1 < min_total:
            return set()
        return {k for k, n in self._counts.items() if (n + 1) / total > limit}

    def _expire(self, now: float) -> None:
        horizon = now - self.window
        picks, counts = self._picks, self._counts
        while picks and picks[0][0] < horizon:
            _, k = picks.popleft()
            n = counts[k] - 1
            if n:
                counts[k] = n
            else:
                del counts[k]
