"""Endpoint discovery from Envoy's admin API (``/clusters?format=json``).

Envoy is the source of truth for health (active health checks, outlier detection), so
discovered hosts carry Envoy's health flags and an unhealthy host is never offered to a
policy. Discovery failures keep the last good view: a flapping admin endpoint must not
empty every route.

The same poller reads, now and then, how long Envoy waits for one ext_proc answer
(``/config_dump``: the filter's ``max_message_timeout``). The gateway queue caps how long
it holds a request by it: past it, Envoy would give up and send the request on unrouted.
"""

from __future__ import annotations

import asyncio
import logging
import time
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


EXT_PROC_TYPE = "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
ENVOY_MESSAGE_TIMEOUT = 0.2   # Envoy's default ext_proc message_timeout
HOLD_LIMIT_EVERY = 60.0       # seconds between two reads of Envoy's config


def _seconds(d: Any) -> float | None:
    """A protobuf Duration as Envoy's JSON dump writes it (``"1.500s"``)."""
    if isinstance(d, str) and d.endswith("s"):
        try:
            return float(d[:-1])
        except ValueError:
            return None
    if isinstance(d, Mapping):   # {"seconds": .., "nanos": ..}
        return float(d.get("seconds", 0)) + float(d.get("nanos", 0)) / 1e9
    return None


def ext_proc_hold_limit(doc: Any) -> float | None:
    """The longest Envoy waits for one ext_proc answer, over every ext_proc filter of a
    ``/config_dump`` (which of them calls ai-lb is not known here: the shortest counts).
    That is ``max_message_timeout`` (the ceiling of ``override_message_timeout``) or, when
    it is unset (0: no overrides), ``message_timeout``. None: no ext_proc filter found."""
    limits = []
    stack = [doc]
    while stack:
        x = stack.pop()
        if isinstance(x, Mapping):
            if str(x.get("@type", "")).endswith(EXT_PROC_TYPE):
                mt = _seconds(x.get("message_timeout"))
                limits.append(max(_seconds(x.get("max_message_timeout")) or 0.0,
                                  ENVOY_MESSAGE_TIMEOUT if mt is None else mt))
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return min(limits) if limits else None


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
                 on_change: Callable[[], None] | None = None, timeout: float = 1.0,
                 on_hold_limit: Callable[[float | None], None] | None = None) -> None:
        self.url = admin_url.rstrip("/") + "/clusters?format=json"
        self.config_url = admin_url.rstrip("/") + "/config_dump"
        self.on_hold_limit = on_hold_limit
        self.hold_limit: float | None = None
        self._hold_read_at = -HOLD_LIMIT_EVERY
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
        if self.on_hold_limit is not None and time.monotonic() - self._hold_read_at >= HOLD_LIMIT_EVERY:
            await self._read_hold_limit(session)

    async def _read_hold_limit(self, session: Any) -> None:
        import aiohttp

        self._hold_read_at = time.monotonic()
        try:
            async with session.get(self.config_url, timeout=aiohttp.ClientTimeout(total=max(self.timeout, 5.0))) as r:
                r.raise_for_status()
                limit = ext_proc_hold_limit(await r.json(content_type=None))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the last value stands
            log.warning("cannot read Envoy's ext_proc timeouts from %s: %s", self.config_url, e)
            return
        if limit != self.hold_limit:
            self.hold_limit = limit
            log.info("Envoy waits at most %s for one ext_proc answer", "an unknown time" if limit is None else f"{limit:g} s")
            self.on_hold_limit(limit)  # type: ignore[misc]

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
