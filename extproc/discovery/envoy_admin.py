"""Endpoint discovery from Envoy's admin API (``/clusters?format=json``).

Envoy is the source of truth for health (active health checks, outlier detection), so
discovered hosts carry Envoy's health flags and an unhealthy host is never offered to a
policy. Discovery failures keep the last good view: a flapping admin endpoint must not
empty every route.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Mapping

from ..core.directory import EndpointDirectory
from ..core.endpoint import Endpoint

log = logging.getLogger("ai_lb.discovery")

# Envoy health flags (admin /clusters?format=json) that take a host out of rotation.
_UNHEALTHY_FLAGS = (
    "failed_active_health_check",
    "failed_outlier_check",
    "failed_eds_health",
    "pending_dynamic_removal",
    "excluded_via_immediate_hc_fail",
    "active_hc_timeout",
)
_HEALTHY_EDS = ("HEALTHY", "UNKNOWN", None)


def parse_admin_clusters(doc: Mapping[str, Any]) -> dict[str, tuple[Endpoint, ...]]:
    """Turn Envoy's ``/clusters?format=json`` into cluster name -> endpoints."""
    out: dict[str, tuple[Endpoint, ...]] = {}
    for cs in doc.get("cluster_statuses", []) or []:
        eps = []
        for hs in cs.get("host_statuses", []) or []:
            sa = (hs.get("address") or {}).get("socket_address") or {}
            if "address" not in sa:
                continue  # pipes and internal addresses cannot be override targets
            hstat = hs.get("health_status") or {}
            healthy = hstat.get("eds_health_status") in _HEALTHY_EDS and not any(hstat.get(f) for f in _UNHEALTHY_FLAGS)
            eps.append(Endpoint(f"{sa['address']}:{sa.get('port_value', 0)}", healthy))
        out[cs.get("name", "")] = tuple(eps)
    return out


class EnvoyAdminDiscovery:
    """Polls Envoy's admin API and feeds the directory."""

    def __init__(self, admin_url: str, directory: EndpointDirectory, interval: float,
                 on_change: Callable[[], None] | None = None, timeout: float = 1.0) -> None:
        self.url = admin_url.rstrip("/") + "/clusters?format=json"
        self.directory = directory
        self.interval = interval
        self.timeout = timeout
        self.on_change = on_change
        self._task: asyncio.Task | None = None
        self._failing = False
        self.synced = False  # the first poll succeeded

    async def refresh_once(self, session: Any) -> None:
        import aiohttp

        async with session.get(self.url, timeout=aiohttp.ClientTimeout(total=self.timeout)) as r:
            r.raise_for_status()
            doc = await r.json(content_type=None)
        changed = self.directory.update_clusters(parse_admin_clusters(doc))
        self.synced = True
        if changed and self.on_change:
            self.on_change()

    async def run(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    await self.refresh_once(session)
                    if self._failing:
                        log.info("endpoint discovery from %s recovered", self.url)
                    self._failing = False
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # noqa: BLE001 - keep the last good view
                    if not self._failing:
                        log.warning("endpoint discovery from %s failed (keeping last view): %s", self.url, e)
                    self._failing = True
                await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="envoy-discovery")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
