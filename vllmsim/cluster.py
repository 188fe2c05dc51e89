"""Many simulated servers in one asyncio process, plus an always-up admin port.

The admin port exists because a crashed server cannot serve its own restart route; it
also lets a test flip faults on several backends with one call.  Routes:

* ``GET  /sim/servers``                      -> list of server states
* ``GET  /sim/servers/{i}/state``            -> one server's state
* ``GET|POST /sim/servers/{i}/faults``       -> read/patch faults
* ``POST /sim/servers/{i}/crash``            -> body ``{"restart_after_s": 1.5}`` optional
* ``POST /sim/servers/{i}/restart``
* ``POST /sim/faults``                       -> patch faults on every server
* ``GET  /health``

``{i}`` is the server index (0-based) or its port.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from aiohttp import web

from .server import ServerConfig, SimServer, make_server_configs


class SimCluster:
    """``async with SimCluster(n=3) as c: c.servers[0].port``.

    Ports: ``ports`` (explicit list) wins; else ``base_port`` + i (consecutive); a
    ``base_port`` of 0 gives every server an ephemeral port.  ``admin_port``: None = no
    admin server, 0 = ephemeral.
    """

    def __init__(self, n: int = 1, *, config: ServerConfig | None = None,
                 configs: Sequence[ServerConfig] | None = None, host: str = "127.0.0.1",
                 base_port: int = 0, ports: Sequence[int] | None = None,
                 admin_port: int | None = 0, **config_kwargs: Any) -> None:
        if configs is not None:
            cfgs = list(configs)
        else:
            base = config or ServerConfig(**config_kwargs)
            if config is not None and config_kwargs:
                raise TypeError("pass either config= or config keyword arguments, not both")
            cfgs = make_server_configs(n, base)
        if ports is not None:
            if len(ports) != len(cfgs):
                raise ValueError(f"{len(ports)} ports given for {len(cfgs)} servers")
            port_list = list(ports)
        else:
            port_list = [base_port + i if base_port else 0 for i in range(len(cfgs))]
        self.host = host
        self.servers = [SimServer(i, c, host, p) for i, (c, p) in enumerate(zip(cfgs, port_list))]
        self.admin_port = admin_port
        self._admin_runner: web.AppRunner | None = None

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    async def start(self) -> None:
        try:
            for s in self.servers:
                await s.start()
            if self.admin_port is not None:
                await self._start_admin()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        for s in self.servers:
            await s.stop()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None

    async def __aenter__(self) -> "SimCluster":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def server(self, ref: int | str) -> SimServer:
        """Server by index or by port."""
        i = int(ref)
        for s in self.servers:
            if s.port == i:
                return s
        if 0 <= i < len(self.servers):
            return self.servers[i]
        raise KeyError(ref)

    # ------------------------------------------------------------------ admin
    async def _start_admin(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/sim/servers", self._list)
        app.router.add_post("/sim/faults", self._faults_all)
        app.router.add_get("/sim/servers/{ref}/state", self._state)
        app.router.add_get("/sim/servers/{ref}/faults", self._faults)
        app.router.add_post("/sim/servers/{ref}/faults", self._faults)
        app.router.add_post("/sim/servers/{ref}/crash", self._crash)
        app.router.add_post("/sim/servers/{ref}/restart", self._restart)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.admin_port or 0, reuse_address=True)
        await site.start()
        self._admin_runner = runner
        self.admin_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def _lookup(self, request: web.Request) -> SimServer:
        try:
            return self.server(request.match_info["ref"])
        except (KeyError, ValueError):
            raise web.HTTPNotFound(text=json.dumps({"error": "no such server"}),
                                   content_type="application/json") from None

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        raw = await request.read()
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except ValueError:
            raise web.HTTPBadRequest(text='{"error":"invalid JSON"}',
                                     content_type="application/json") from None
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(text='{"error":"expected a JSON object"}',
                                     content_type="application/json")
        return data

    @staticmethod
    async def _health(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _list(self, request: web.Request) -> web.Response:
        return web.json_response([s.state() for s in self.servers])

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self._lookup(request).state())

    async def _faults(self, request: web.Request) -> web.Response:
        srv = self._lookup(request)
        if request.method == "POST":
            data = await self._body(request)
            try:
                if data.pop("reset", False):
                    srv.faults.reset()
                srv.faults.update(data)
            except ValueError as e:
                return web.json_response({"error": str(e)}, status=400)
        return web.json_response(srv.faults.to_dict())

    async def _faults_all(self, request: web.Request) -> web.Response:
        data = await self._body(request)
        reset = data.pop("reset", False)
        try:
            for s in self.servers:
                if reset:
                    s.faults.reset()
                s.faults.update(data)
        except ValueError as e:
            return web.json_response({"error": str(e)}, status=400)
        return web.json_response([s.faults.to_dict() for s in self.servers])

    async def _crash(self, request: web.Request) -> web.Response:
        srv = self._lookup(request)
        data = await self._body(request)
        delay = data.get("restart_after_s")
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, (int, float))):
            return web.json_response({"error": "restart_after_s must be a number"}, status=400)
        await srv.crash(delay)
        return web.json_response(srv.state())

    async def _restart(self, request: web.Request) -> web.Response:
        srv = self._lookup(request)
        try:
            await srv.restart()
        except OSError as e:
            return web.json_response({"error": f"restart failed: {e}"}, status=500)
        return web.json_response(srv.state())

