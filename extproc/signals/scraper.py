"""One metrics scraper per endpoint, however many routes and policies read it.

``ScraperService`` runs one asyncio task per endpoint (address and metrics path), each
fetching ``http://ADDR/metrics`` through one shared aiohttp session. Readers hold a
``Subscription``: its ``want(addresses)`` says which endpoints it reads (the runtime calls
it whenever discovery changes a route's candidates, so scraping follows the fleet, not the
traffic), and ``get(address)`` returns the last good sample only while it is younger than
the subscription's ``stale_after``: a failed or old scrape is *unknown*, never zero.

An endpoint is scraped at the shortest ``interval`` any subscription asks for, with the
union of their extra metric names, while at least one subscription wants it. A reload that
keeps a route's policy keeps its subscription; one that replaces it subscribes the new
policy before the old one closes, so the view never goes cold. Every good sample is also
handed to ``on_sample(address, metrics, requested_at)`` (the load view, which needs to know
when the photo was taken to tell which picks it already shows).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from .metrics import EndpointMetrics, parse_metrics

log = logging.getLogger("ai_lb.scrape")


@dataclass(frozen=True)
class ScrapeSpec:
    interval: float = 0.1
    timeout: float = 0.5
    stale_after: float = 1.0
    path: str = "/metrics"
    extra: tuple[str, ...] = ()


class Subscription:
    """What one reader wants scraped, and its view of the samples."""

    def __init__(self, service: "ScraperService", spec: ScrapeSpec) -> None:
        self.service = service
        self.spec = spec
        self.addresses: frozenset[str] = frozenset()
        self.closed = False

    def want(self, addresses: Iterable[str]) -> None:
        new = frozenset(addresses)
        if new != self.addresses and not self.closed:
            old, self.addresses = self.addresses, new
            self.service._changed(old | new)

    def get(self, address: str, now: float | None = None) -> EndpointMetrics | None:
        m = self.service.state.get((address, self.spec.path))
        if m is None:
            return None
        if (now if now is not None else time.monotonic()) - m.at > self.spec.stale_after:
            return None
        return m

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.service._subs.discard(self)
            self.service._changed(self.addresses)


class ScraperService:
    def __init__(self, on_sample: Callable[[str, EndpointMetrics, float], None] | None = None,
                 scheme: str = "http") -> None:
        self.on_sample = on_sample
        self.scheme = scheme
        self.state: dict[tuple[str, str], EndpointMetrics] = {}   # (address, path) -> last good
        self.failures: dict[str, int] = {}      # address -> failed scrapes (cumulative)
        self.errors: dict[str, str] = {}        # address -> last error
        self._subs: set[Subscription] = set()
        self._tasks: dict[tuple[str, str], asyncio.Task] = {}
        self._session = None
        self._closed = False

    def subscribe(self, spec: ScrapeSpec) -> Subscription:
        sub = Subscription(self, spec)
        self._subs.add(sub)
        return sub

    # -- what each endpoint needs ------------------------------------------------------
    def _specs(self, address: str, path: str) -> list[ScrapeSpec]:
        return [s.spec for s in self._subs if s.spec.path == path and address in s.addresses]

    def _settings(self, address: str, path: str) -> tuple[float, float, tuple[str, ...]] | None:
        specs = self._specs(address, path)
        if not specs:
            return None
        extra = tuple(sorted({n for s in specs for n in s.extra}))
        return min(s.interval for s in specs), max(s.timeout for s in specs), extra

    def _changed(self, addresses: Iterable[str]) -> None:
        if self._closed or self._session is None:
            return
        for a in addresses:
            for path in {s.spec.path for s in self._subs} | {p for (x, p) in self._tasks if x == a}:
                key = (a, path)
                if key not in self._tasks and self._settings(a, path) is not None:
                    self._tasks[key] = asyncio.get_running_loop().create_task(self._loop(a, path),
                                                                              name=f"scrape {a}{path}")

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
            self._changed({a for s in self._subs for a in s.addresses})

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except BaseException:  # noqa: BLE001 - cancelled or already failed
                pass
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def scrape_once(self, address: str, path: str = "/metrics", timeout: float = 0.5,
                          extra: Iterable[str] = ()) -> EndpointMetrics:
        import aiohttp

        requested_at = time.monotonic()
        async with self._session.get(f"{self.scheme}://{address}{path}",
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}")
            text = await r.text(errors="replace")
        m = parse_metrics(text, extra)
        self.state[(address, path)] = m
        if self.on_sample is not None:
            self.on_sample(address, m, requested_at)
        return m

    async def _loop(self, address: str, path: str) -> None:
        failing = False
        key = (address, path)
        try:
            while not self._closed:
                settings = self._settings(address, path)
                if settings is None:
                    return  # nobody reads it any more; its last sample ages out
                interval, timeout, extra = settings
                t0 = time.monotonic()
                try:
                    await self.scrape_once(address, path, timeout, extra)
                    if failing:
                        log.info("metrics scrape of %s recovered", address)
                    failing = False
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - the endpoint becomes unknown when stale
                    self.failures[address] = self.failures.get(address, 0) + 1
                    self.errors[address] = f"{type(e).__name__}: {e}"[:200]
                    if not failing:
                        log.warning("metrics scrape of %s failed: %s", address, self.errors[address])
                    failing = True
                await asyncio.sleep(max(0.0, interval - (time.monotonic() - t0)))
        finally:
            if self._tasks.get(key) is asyncio.current_task():
                del self._tasks[key]
