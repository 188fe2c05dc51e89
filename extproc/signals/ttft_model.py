"""Predicted time to first token, with a cost model calibrated online (FlexLB's prefill view).

    TTFT(endpoint) ~ base + per_token x (prefill work ahead of the request + its own)
                   + per_running x (sequences running there)

* The request's own work is its *uncached* prompt tokens, plus ``hit_cost`` (0.3, FlexLB's
  default) per cached token: a cache hit is cheap, not free.
* The work ahead is a per-endpoint backlog of the work ai-lb sent there, drained at the
  model's prefill rate (1 / per_token tokens per second) as time passes (a fluid queue),
  and cut at once when a request's prefill is known to be over (first token or end).
* Running sequences slow every engine step (decode batches share the GPU with prefill).

The three coefficients are fitted by recursive least squares with exponential forgetting
from TTFTs that ai-lb observes (a sample of responses is watched to their first token),
each against the features the decision used. Until ``min_samples`` observations have
arrived, the defaults (an H100 serving an 8B model) stand. Coefficients are kept
non-negative: a fit that says more work is faster is noise.
"""

from __future__ import annotations

import time
from typing import Callable


class TtftModel:
    def __init__(self, per_token: float = 6e-5, base: float = 0.01, per_running: float = 5e-4,
                 hit_cost: float = 0.3, forget: float = 0.995, min_samples: int = 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.theta = [base, per_token, per_running]      # base, per work token, per running sequence
        self.hit_cost = hit_cost
        self.forget = forget
        self.min_samples = min_samples
        self.samples = 0
        self._fit = list(self.theta)
        # Prior covariance of (base, per_token, per_running): loose (~0.3 s, ~3e-4 s/token, ~1e-2 s/seq).
        self._p = [[1e-1, 0.0, 0.0], [0.0, 1e-7, 0.0], [0.0, 0.0, 1e-4]]
        self._clock = clock
        self._backlog: dict[str, tuple[float, float]] = {}  # address -> (tokens, as of time)

    # -- the model ---------------------------------------------------------------------
    @property
    def per_token(self) -> float:
        return max(self.theta[1], 1e-9)

    def work(self, prompt_tokens: float, cached_tokens: float) -> float:
        return max(0.0, prompt_tokens - cached_tokens) + self.hit_cost * cached_tokens

    def backlog(self, address: str, now: float | None = None) -> float:
        b = self._backlog.get(address)
        if b is None:
            return 0.0
        now = self._clock() if now is None else now
        return max(0.0, b[0] - (now - b[1]) / self.per_token)

    def features(self, address: str, work: float, running: float, now: float | None = None) -> tuple[float, float]:
        return self.backlog(address, now) + work, running

    def predict(self, features: tuple[float, float]) -> float:
        base, per_token, per_running = self.theta
        return base + per_token * features[0] + per_running * features[1]

    def sent(self, address: str, work: float, now: float | None = None) -> None:
        """A request with ``work`` tokens of prefill was sent to ``address``."""
        now = self._clock() if now is None else now
        self._backlog[address] = (self.backlog(address, now) + work, now)

    def prefilled(self, address: str, work: float, now: float | None = None) -> None:
        """A request's prefill is known to be over (its first token, or its end): its work
        leaves the backlog at once, whatever the drain rate assumed."""
        now = self._clock() if now is None else now
        self._backlog[address] = (max(0.0, self.backlog(address, now) - work), now)

    def forget_endpoints(self, keep: set[str]) -> None:
        for a in [a for a in self._backlog if a not in keep]:
            del self._backlog[a]

    # -- calibration ---------------------------------------------------------------------
    def observe(self, features: tuple[float, float], ttft: float) -> None:
        """A TTFT seen for a request whose decision used ``features``."""
        x = (1.0, features[0], features[1])
        p = self._p
        px = [sum(p[i][j] * x[j] for j in range(3)) for i in range(3)]
        denom = self.forget + sum(x[i] * px[i] for i in range(3))
        k = [v / denom for v in px]
        err = ttft - sum(self._fit[i] * x[i] for i in range(3))
        self._fit = [self._fit[i] + k[i] * err for i in range(3)]
        self._p = [[(p[i][j] - k[i] * px[j]) / self.forget for j in range(3)] for i in range(3)]
        self.samples += 1
        if self.samples >= self.min_samples:
            self.theta = [max(0.0, v) for v in self._fit]
