"""When is an endpoint full? Any configured limit reached, read from the shared load view.

Limits (``queue.saturation``; 0 switches one off): requests in flight there
(``max_inflight``: this instance's, or the cluster-wide count a Redis-shared queue keeps),
its scraped waiting queue with the picks assumed since (``max_waiting``), its KV-cache
usage with assumed blocks (``max_kv``), prompt tokens in flight (``max_tokens``).
Metrics that are unknown (no fresh scrape) never make an endpoint full.
"""

from __future__ import annotations

from ..config import SaturationConfig
from ..signals.load import EndpointLoad

STALE_AFTER = 1.0


class Saturation:
    __slots__ = ("cfg",)

    def __init__(self, cfg: SaturationConfig) -> None:
        self.cfg = cfg

    def room(self, r: EndpointLoad, now: float, inflight: int | None = None) -> bool:
        """Does ``r`` take one more request? ``inflight``: the count to judge by (default:
        this instance's)."""
        c = self.cfg
        n = r.requests if inflight is None else inflight
        if c.max_inflight and n >= c.max_inflight:
            return False
        if c.max_tokens and r.tokens >= c.max_tokens:
            return False
        if c.max_waiting or c.max_kv:
            m = r.fresh(now, STALE_AFTER)
            if m is not None:
                if c.max_waiting and m.waiting is not None and r.waiting(now, STALE_AFTER) >= c.max_waiting:
                    return False
                if c.max_kv:
                    kv = r.kv(now, STALE_AFTER)
                    if kv is not None and kv >= c.max_kv:
                        return False
        return True
