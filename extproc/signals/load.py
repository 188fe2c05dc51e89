"""The load view: one record per endpoint that every load-aware policy reads.

What the core knows of an endpoint's load, from two sources:

* this process's own requests (``LocalInflight``): counted by the core on every pick and
  released when the request ends, exactly once each, with the prompt tokens the policy
  estimated for it;
* the endpoint's own metrics (``ScraperService`` hands every good sample to
  ``on_scrape``): running, waiting, KV-cache usage.

Cluster-wide counts across ai-lb instances are the state store's
(``state.counts.GlobalCounts``), read by the policies that share them.
"""

from __future__ import annotations

from ..state.inflight import LocalInflight
from .metrics import EndpointMetrics


class LoadView:
    __slots__ = ("inflight", "_tokens", "_metrics")

    def __init__(self, inflight: LocalInflight | None = None) -> None:
        self.inflight = inflight or LocalInflight()
        self._tokens: dict[str, int] = {}
        self._metrics: dict[str, EndpointMetrics] = {}

    # -- the core's accounting (exactly once per routed request) ------------------------
    def begin(self, address: str, tokens: int = 0) -> None:
        self.inflight.inc(address)
        if tokens:
            self._tokens[address] = self._tokens.get(address, 0) + tokens

    def end(self, address: str, tokens: int = 0) -> None:
        self.inflight.dec(address)
        if tokens:
            n = self._tokens.get(address, 0) - tokens
            if n > 0:
                self._tokens[address] = n
            else:
                self._tokens.pop(address, None)

    def on_scrape(self, address: str, m: EndpointMetrics) -> None:
        self._metrics[address] = m

    # -- reading -------------------------------------------------------------------------
    def requests(self, address: str) -> int:
        """Requests this process has in flight on ``address``."""
        return self.inflight.get(address)

    def tokens(self, address: str) -> int:
        """Prompt tokens of this process's requests in flight on ``address``."""
        return self._tokens.get(address, 0)

    def metrics(self, address: str) -> EndpointMetrics | None:
        """The endpoint's last good scrape, however old (``.at`` says when)."""
        return self._metrics.get(address)
