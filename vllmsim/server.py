"""One simulated server: engine + aiohttp app on one port (+ KV events, + PD side channel).

A ``SimServer`` owns one engine and one listening socket.  ``crash()`` closes the socket
and cuts every open connection (clients see resets, then connection refused), closes its
KV-event publisher and side channel and throws the engine state away; ``restart()``
brings up a fresh engine (empty KV cache, zeroed counters, event sequence from 0, as
after a real process restart) on the same port.  Because a crashed server cannot answer
its own admin routes, restart goes through the Python API, the cluster's admin port
(cluster.py) or ``restart_after_s``.

Routes: ``handlers.py`` (inference) and ``admin_routes.py``.  Every response carries
``x-sim-server: <name>`` (default: the port) so a test behind a gateway can see which
backend served it — unless ``sim_api`` is off, which also removes every ``/sim/*`` route
and ``x-sim-*`` header so the server looks like a plain vLLM.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from aiohttp import ClientSession, web

from .admin_routes import AdminRoutes
from .engine import Engine
from .faults import Faults
from .handlers import InferenceRoutes
from .kv_events import KVEventsConfig, ZmqEventPublisher
from .metrics import EngineMetrics
from .pd import DEFAULT_ABORT_TIMEOUT_S, HeldBlocks, KVTransferConfig, SideChannel
from .profile import Profile, load_profile

log = logging.getLogger("vllmsim")

SERVER_HEADER = "x-sim-server"
_ROLE_KV = {"prefill": "kv_producer", "decode": "kv_consumer"}


@dataclass
class ServerConfig:
    """Per-server settings (everything except the port)."""

    model: str = "meta-llama/Meta-Llama-3-8B-Instruct"
    profile: Profile = field(default_factory=load_profile)
    role: str = "mixed"  # "prefill"/"decode": a kv-transfer config with that kv_role
    time_scale: float = 1.0
    seed: int = 0
    name: str | None = None  # x-sim-server value; default: the port
    metrics_flavor: str = "vllm"  # vllm | sglang
    legacy_gpu_cache_metric: bool = False
    lora_adapters: tuple[str, ...] = ()
    stream_chunk_tokens: int = 1
    faults: Faults = field(default_factory=Faults)
    restart_after_s: float | None = None  # auto-restart delay after a crash
    kv_events: KVEventsConfig | None = None  # vLLM's --kv-events-config (before offsets)
    kv_transfer: KVTransferConfig | None = None  # vLLM's --kv-transfer-config
    kv_abort_timeout_s: float = DEFAULT_ABORT_TIMEOUT_S  # simulated seconds
    sim_api: bool = True  # /sim/* routes and x-sim-* headers


class SimServer(InferenceRoutes, AdminRoutes):
    """One simulated vLLM server on one port."""

    def __init__(self, index: int, config: ServerConfig, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.index = index
        self.config = config
        self.host = host
        self.port = port
        self.faults = Faults(**config.faults.to_dict())
        self.kv_transfer = config.kv_transfer or (
            KVTransferConfig(kv_role=_ROLE_KV[config.role]) if config.role in _ROLE_KV else None)
        self.engine: Engine | None = None
        self.metrics: EngineMetrics | None = None
        self.publisher: ZmqEventPublisher | None = None
        self._side: SideChannel | None = None
        self._session: ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._restart_task: asyncio.Task[None] | None = None
        self._crash_task: asyncio.Future[None] | None = None
        self._rng = random.Random(f"faults-{config.seed}-{index}")
        self._ids = 0
        self.crashes = 0
        self._gen_mark = (0.0, 0)

    # ------------------------------------------------------------ properties
    @property
    def name(self) -> str:
        return self.config.name or str(self.port)

    @property
    def alive(self) -> bool:
        return self._site is not None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def engine_id(self) -> str:
        """Changes on every restart, like the engine id of a new vLLM process."""
        return f"vllmsim-{self.host}-{self.port}-{self.crashes}"

    @property
    def side_channel_port(self) -> int | None:
        return self._side.port if self._side is not None else None

    def lora_id(self, lora: str | None) -> int | None:
        return self.config.lora_adapters.index(lora) + 1 if lora else None

    def client_session(self) -> ClientSession:
        """For reads from other servers' side channels."""
        if self._session is None or self._session.closed:
            self._session = ClientSession()
        return self._session

    # ------------------------------------------------------------- lifecycle
    def _build_engine(self) -> None:
        cfg = self.config
        p = cfg.profile
        self.metrics = EngineMetrics(
            cfg.model, block_size=p.block_size, num_gpu_blocks=p.num_gpu_blocks,
            enable_prefix_caching=p.enable_prefix_caching,
            gpu_memory_utilization=p.gpu_memory_utilization, max_num_seqs=p.max_num_seqs,
            flavor=cfg.metrics_flavor, legacy_gpu_cache=cfg.legacy_gpu_cache_metric,
            lora_enabled=bool(cfg.lora_adapters), max_loras=p.max_loras)
        ev = cfg.kv_events
        if ev is not None and ev.enabled:
            self.publisher = ZmqEventPublisher(ev.for_server(self.index, self.host, self.port, cfg.model))
        self.engine = Engine(p, self.metrics, role=cfg.role, time_scale=cfg.time_scale,
                             seed=cfg.seed * 1000003 + self.index + 7919 * self.crashes,
                             slowdown=lambda: self.faults.slowdown,
                             publish=self.publisher.publish if self.publisher else None,
                             abort_timeout_s=cfg.kv_abort_timeout_s)
        self.engine.start()

    def _holds_for(self, engine_id: str) -> HeldBlocks | None:
        return self.engine.holds if self.engine is not None and engine_id == self.engine_id else None

    async def start(self) -> None:
        """Create the engine and start listening (binds ``port``; 0 picks a free one)."""
        if self._site is not None:
            return
        runner = web.AppRunner(build_app(self), handler_cancellation=True, access_log=None,
                               shutdown_timeout=0.2)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True, backlog=1024)
        try:
            await site.start()
            if self.port == 0:
                self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self._build_engine()  # no await since listening: no request can precede it
            if self.kv_transfer is not None:
                self._side = SideChannel(self.host, self.kv_transfer.side_channel_port(self.index),
                                         self._holds_for)
                await self._side.start()
        except BaseException:
            await runner.cleanup()
            await self._drop_engine()
            raise
        self._runner, self._site = runner, site

    async def _drop_engine(self) -> None:
        if self._side is not None:
            await self._side.stop()
            self._side = None
        if self.engine is not None:
            await self.engine.stop()
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None

    async def crash(self, restart_after_s: float | None = None, auto_restart: bool = True) -> None:
        """Stop listening, reset all connections and drop engine state.

        ``restart_after_s`` (or the config's) schedules an automatic restart.
        """
        if self._site is None:
            return
        runner, site = self._runner, self._site
        self._runner = self._site = None
        self.crashes += 1
        await site.stop()
        server = runner.server if runner is not None else None
        if server is not None:
            for transport in list(server._connections.values()):
                transport.abort()
        await self._drop_engine()
        if runner is not None:
            await runner.cleanup()
        delay = restart_after_s if restart_after_s is not None else self.config.restart_after_s
        if delay is not None and auto_restart:
            self._restart_task = asyncio.get_running_loop().create_task(self._delayed_restart(delay))

    async def _delayed_restart(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._restart_task = None
        await self.restart()

    async def restart(self) -> None:
        """Come back after a crash with a fresh engine and the start-up faults."""
        if self._restart_task is not None and asyncio.current_task() is not self._restart_task:
            self._restart_task.cancel()
            self._restart_task = None
        if self._site is not None:
            return
        self.faults = Faults(**self.config.faults.to_dict())
        await self.start()

    async def stop(self) -> None:
        """Shut down for good (no auto-restart)."""
        if self._site is not None:
            await self.crash(auto_restart=False)
        if self._restart_task is not None:
            self._restart_task.cancel()
            self._restart_task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -------------------------------------------------------------- helpers
    async def _tag_response(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers[SERVER_HEADER] = self.name

    def _next_id(self, prefix: str) -> str:
        self._ids += 1
        digest = hashlib.blake2b(f"{self.config.seed}-{self.index}-{self.crashes}-{self._ids}".encode(),
                                 digest_size=8).hexdigest()
        return f"{prefix}-{digest}"

    def state(self) -> dict[str, Any]:
        """Engine snapshot plus identity (for tests and oracles)."""
        base: dict[str, Any] = {
            "index": self.index, "name": self.name, "port": self.port, "alive": self.alive,
            "crashes": self.crashes, "model": self.config.model, "faults": self.faults.to_dict(),
            "engine_id": self.engine_id,
            "kv_role": self.kv_transfer.kv_role if self.kv_transfer else None,
            "side_channel_port": self.side_channel_port,
            "kv_events": self.publisher.describe() if self.publisher else None}
        if self.alive and self.engine is not None:
            base.update(self.engine.state())
        return base


def build_app(srv: "SimServer") -> web.Application:
    """The route table of one server."""
    app = web.Application(client_max_size=256 * 1024 * 1024)
    add_get, add_post = app.router.add_get, app.router.add_post
    add_post("/v1/chat/completions", srv._chat)
    add_post("/v1/completions", srv._completions)
    add_get("/v1/models", srv._models)
    add_get("/health", srv._health)
    add_get("/ping", srv._health)
    add_get("/version", srv._version)
    add_get("/metrics", srv._metrics)
    add_post("/reset_prefix_cache", srv._reset_prefix_cache)
    if srv.config.metrics_flavor == "sglang":
        add_post("/flush_cache", srv._flush_cache)
        add_get("/flush_cache", srv._flush_cache)
    if srv.config.sim_api:
        add_get("/sim/state", srv._state)
        add_get("/sim/faults", srv._get_faults)
        add_post("/sim/faults", srv._set_faults)
        add_post("/sim/crash", srv._crash_route)
        add_post("/sim/match", srv._match)
        app.on_response_prepare.append(srv._tag_response)
    return app


def make_server_configs(n: int, base: ServerConfig, names: Sequence[str] | None = None
                        ) -> list[ServerConfig]:
    """Per-server copies of one config (distinct names where given)."""
    out = []
    for i in range(n):
        cfg = ServerConfig(**{**base.__dict__})
        cfg.faults = Faults(**base.faults.to_dict())
        if names is not None and i < len(names):
            cfg.name = names[i]
        out.append(cfg)
    return out
