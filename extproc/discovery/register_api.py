"""The registration API, FastDeploy router's shape, so its instances register unchanged:

* ``POST /register`` (an ``InstanceInfo`` JSON object): 200 ``{"code":200,"msg":"Register
  success"}``; 400 ``{"code":400,"msg":...}`` for a body that is not JSON or not a valid
  instance (every problem, ``; ``-separated); 503 when the instance fails its health checks
  ("service is not healthy") or the registry store is unavailable; 409 when the registry is
  full; 413 for a body over 64 KiB. A refused registration changes nothing.
* ``GET /registered``: ``{"code":200,"msg":"success","prefill":[...],"decode":[...],
  "mixed":[...]}`` (FastDeploy's ``WorkerInfo`` fields, plus ``healthy``).
* ``GET /registered_number``: ``{"mixed":N,"prefill":N,"decode":N}``.
* ``GET /health_generate``: checks every instance now: ``{"code":200,"msg":"Health check
  complete","healthy":[...],"unhealthy":[...]}``.

Every path takes ``Authorization: Bearer <token>`` when a token is configured (401
otherwise, compared in constant time); without one the API listens on loopback only (the
config refuses anything else). Refusals are counted in ``ai_lb_registry_events_total``
and logged without the request's content.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

import orjson
from aiohttp import web

from ..telemetry import RateLimitedLog
from .instances import parse_instance
from .registry import Rejected, RegistrySource

log = logging.getLogger("ai_lb.registry")
MAX_BODY = 64 * 1024
ROUTES = ("/register", "/registered", "/registered_number", "/health_generate")


def _answer(status: int, msg: str, **extra: Any) -> web.Response:
    return web.Response(status=status, content_type="application/json",
                        body=orjson.dumps({"code": status, "msg": msg, **extra}))


class RegisterApi:
    def __init__(self, source: RegistrySource, listen: str, token: str | None) -> None:
        self.source = source
        self.listen = listen
        self._token = ("Bearer " + token).encode() if token else None
        self._runner: web.AppRunner | None = None
        self._log = RateLimitedLog(10.0)
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._auth])
        app.router.add_post("/register", self._register)
        app.router.add_get("/registered", self._registered)
        app.router.add_get("/registered_number", self._number)
        app.router.add_get("/health_generate", self._health_generate)
        return app

    async def start(self) -> int:
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        host, _, port = self.listen.rpartition(":")
        site = web.TCPSite(self._runner, host.strip("[]"), int(port), reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("registration API on %s:%d (%s)", host, self.port,
                 "bearer token required" if self._token else "no token: loopback only")
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _refuse(self, reason: str, status: int, msg: str, peer: str | None) -> web.Response:
        self.source.events.labels(f"rejected_{reason}").inc()
        self._log.warn(("register", reason), "registration API: refused a request from %s (%s)", peer or "?", reason)
        return _answer(status, msg)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self._token is not None:
            got = request.headers.get("Authorization", "").encode("latin-1", "replace")
            if not hmac.compare_digest(got, self._token):
                r = self._refuse("unauthorized", 401, "missing or invalid bearer token", request.remote)
                r.headers["WWW-Authenticate"] = 'Bearer realm="ai-lb registration"'
                return r
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return self._refuse("too_large", 413, f"request body over {MAX_BODY} bytes", request.remote)
        except web.HTTPException as e:
            return _answer(e.status, e.reason)

    async def _register(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            raw = orjson.loads(body)
        except ValueError as e:
            return self._refuse("bad_json", 400, f"Invalid InstanceInfo JSON format: {str(e)[:120]}", request.remote)
        inst, problems = parse_instance(raw, origin="api", now=time.time())
        if inst is None:
            return self._refuse("invalid", 400, "invalid InstanceInfo: " + "; ".join(problems), request.remote)
        try:
            await self.source.register(inst)
        except Rejected as e:
            reason = {503: "unhealthy", 409: "full"}.get(e.status, "refused")
            return self._refuse(reason, e.status, e.msg, request.remote)
        self.source.events.labels("registered").inc()
        return _answer(200, "Register success")

    async def _registered(self, request: web.Request) -> web.Response:
        return _answer(200, "success", **self.source.listing())

    async def _number(self, request: web.Request) -> web.Response:
        counts = {role: len(v) for role, v in self.source.listing().items()}
        return web.Response(content_type="application/json", body=orjson.dumps(counts))

    async def _health_generate(self, request: web.Request) -> web.Response:
        return _answer(200, "Health check complete", **await self.source.health_generate())
