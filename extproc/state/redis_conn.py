"""Redis connections for the shared-state stores, with a bounded wait and a breaker.

Redis is on the request path of the global policies, so a slow or dead Redis must cost
a request at most ``timeout`` (default 50 ms, where Higress waits 3 s), and after a
failure the breaker opens so later requests do not wait at all: they use the local
fallback until a probe after ``cooldown`` finds Redis back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, TypeVar

from ..config import redact

log = logging.getLogger("ai_lb.redis")
T = TypeVar("T")
__all__ = ["Breaker", "RedisConn", "RedisUnavailable", "redact"]


class RedisUnavailable(Exception):
    """Redis did not answer within the bound, or the breaker is open."""


class Breaker:
    def __init__(self, cooldown: float = 1.0) -> None:
        self.cooldown = cooldown
        self.open_until = 0.0
        self.trips = 0

    def allow(self) -> bool:
        return time.monotonic() >= self.open_until

    def fail(self) -> None:
        if self.allow():
            self.trips += 1
        self.open_until = time.monotonic() + self.cooldown

    def ok(self) -> None:
        self.open_until = 0.0


class RedisConn:
    """One client per Redis URL; ``call`` applies the time bound and the breaker."""

    def __init__(self, url: str, timeout: float = 0.05, cooldown: float = 1.0) -> None:
        from .resp import RespClient

        self.url = url
        self.timeout = timeout
        self.breaker = Breaker(cooldown)
        # Connecting may take longer than one call's bound; the call still gives up in time.
        self.client = RespClient.from_url(url, connect_timeout=max(timeout, 0.5))
        self.was_down = False
        self.on_recover: list[Callable[[], Awaitable[None]]] = []

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        if not self.breaker.allow():
            raise RedisUnavailable("breaker open")
        try:
            async with asyncio.timeout(self.timeout):  # no extra task, unlike wait_for
                r = await fn()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - timeouts, connection errors, script errors
            self.breaker.fail()
            if not self.was_down:
                log.warning("redis %s unavailable (%s); using local state", redact(self.url), type(e).__name__)
            self.was_down = True
            raise RedisUnavailable(str(e)) from None
        self.breaker.ok()
        if self.was_down:
            self.was_down = False
            log.info("redis %s is back", redact(self.url))
            for cb in self.on_recover:
                asyncio.get_running_loop().create_task(cb())
        return r

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except Exception:  # noqa: BLE001
            pass
