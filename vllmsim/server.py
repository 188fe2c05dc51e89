"""HTTP face of one simulated server: vLLM's OpenAI API plus ``/sim/*`` admin routes.

A ``SimServer`` owns one engine and one listening socket.  ``crash()`` closes the socket
and cuts every open connection (clients see resets, then connection refused) and throws
the engine state away; ``restart()`` brings up a fresh engine (empty KV cache, zeroed
counters, as after a real process restart) on the same port.  Because a crashed server
cannot answer its own admin routes, restart goes through the Python API, the cluster's
admin port (cluster.py) or ``restart_after_s``.

Every response carries ``x-sim-server: <name>`` (default: the port) so a test behind a
gateway can see which backend served it.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from aiohttp import web

from .engine import Engine, Request
from .faults import Faults
from .metrics import EngineMetrics
from .profile import Profile, load_profile
from .protocol import (APIError, GenRequest, StreamFormatter, error_body, filler_text,
                       full_response, parse_request, text_seed)
from .kvcache import block_hashes

log = logging.getLogger("vllmsim")

SERVER_HEADER = "x-sim-server"


def _dumps(obj: Any) -> str:
    """Compact JSON, as FastAPI/pydantic (vLLM) writes it."""
    return json.dumps(obj, separators=(",", ":"))
_JSON = "application/json"


@dataclass
class ServerConfig:
    """Per-server settings (everything except the port)."""

    model: str = "meta-llama/Meta-Llama-3-8B-Instruct"
    profile: Profile = field(default_factory=load_profile)
    role: str = "mixed"
    time_scale: float = 1.0
    seed: int = 0
    name: str | None = None  # x-sim-server value; default: the port
    metrics_flavor: str = "vllm"  # vllm | sglang
    legacy_gpu_cache_metric: bool = False
    lora_adapters: tuple[str, ...] = ()
    stream_chunk_tokens: int = 1
    faults: Faults = field(default_factory=Faults)
    restart_after_s: float | None = None  # auto-restart delay after a crash


class SimServer:
    """One simulated vLLM server (engine + aiohttp app) on one port."""

    def __init__(self, index: int, config: ServerConfig, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.index = index
        self.config = config
        self.host = host
        self.port = port
        self.faults = Faults(**config.faults.to_dict())
        self.engine: Engine | None = None
        self.metrics: EngineMetrics | None = None
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
        self.engine = Engine(p, self.metrics, role=cfg.role, time_scale=cfg.time_scale,
                             seed=cfg.seed * 1000003 + self.index + 7919 * self.crashes,
                             slowdown=lambda: self.faults.slowdown)
        self.engine.start()

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ping", self._health)
        app.router.add_get("/version", self._version)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/reset_prefix_cache", self._reset_prefix_cache)
        app.router.add_get("/sim/state", self._state)
        app.router.add_get("/sim/faults", self._get_faults)
        app.router.add_post("/sim/faults", self._set_faults)
        app.router.add_post("/sim/crash", self._crash_route)
        app.router.add_post("/sim/match", self._match)
        app.on_response_prepare.append(self._tag_response)
        return app

    async def start(self) -> None:
        """Create the engine and start listening (binds ``port``; 0 picks a free one)."""
        if self._site is not None:
            return
        self._build_engine()
        runner = web.AppRunner(self._build_app(), handler_cancellation=True, access_log=None,
                               shutdown_timeout=0.2)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True, backlog=1024)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            if self.engine is not None:
                await self.engine.stop()
            raise
        if self.port == 0:
            sock = site._server.sockets[0]  # type: ignore[union-attr]
            self.port = sock.getsockname()[1]
        self._runner, self._site = runner, site

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
        if self.engine is not None:
            await self.engine.stop()
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
        if self._restart_task is not None:
            self._restart_task.cancel()
            self._restart_task = None
        if self._site is not None:
            await self.crash(auto_restart=False)
        if self._restart_task is not None:
            self._restart_task.cancel()
            self._restart_task = None

    # -------------------------------------------------------------- helpers
    async def _tag_response(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers[SERVER_HEADER] = self.name

    def _error(self, err: APIError) -> web.Response:
        return web.Response(status=err.status, text=_dumps(err.body()), content_type=_JSON)

    def _next_id(self, prefix: str) -> str:
        self._ids += 1
        digest = hashlib.blake2b(f"{self.config.seed}-{self.index}-{self.crashes}-{self._ids}".encode(),
                                 digest_size=8).hexdigest()
        return f"{prefix}-{digest}"

    def state(self) -> dict[str, Any]:
        """Engine snapshot plus identity (for tests and oracles)."""
        base = {"index": self.index, "name": self.name, "port": self.port, "alive": self.alive,
                "crashes": self.crashes, "model": self.config.model,
                "faults": self.faults.to_dict()}
        if self.alive and self.engine is not None:
            base.update(self.engine.state())
        return base

    # ------------------------------------------------------------ inference
    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def _read_json(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(f"JSON decode error: {e}") from None

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        engine = self.engine
        assert engine is not None
        cfg = self.config
        try:
            body = await self._read_json(request)
            gen = parse_request(body, kind, served_model=cfg.model,
                                loras=frozenset(cfg.lora_adapters),
                                default_max_tokens=cfg.profile.default_max_tokens,
                                max_model_len=cfg.profile.effective_max_model_len)
        except APIError as e:
            return self._error(e)
        if self.faults.hang:
            await asyncio.Event().wait()  # until the client gives up (handler cancelled)
        if self.faults.should_fail(self._rng):
            status = self.faults.error_status
            return web.Response(status=status, content_type=_JSON, text=_dumps(
                error_body("vllmsim injected failure", status)))
        stream_every = max(1, cfg.stream_chunk_tokens) if gen.stream else 1 << 30
        hashes = block_hashes(gen.token_ids, cfg.profile.block_size, gen.lora)
        req = engine.new_request(len(gen.token_ids), None, gen.max_tokens, gen.lora,
                                 notify_every=stream_every, hashes=hashes)
        rid = self._next_id("chatcmpl" if kind == "chat" else "cmpl")
        created = int(time.time())
        engine.add(req)
        try:
            if gen.stream:
                return await self._stream(request, gen, req, rid, created)
            while not req.finished:
                await req.event.wait()
                req.event.clear()
            if req.finish_reason == "abort":
                return self._error(APIError("request aborted (server crashed)", 500))
            text = filler_text(text_seed(rid), 0, req.num_output)
            kvp = self._kv_transfer_params(req) if cfg.role == "prefill" else None
            body_out = full_response(kind, rid, created, gen.model, text,
                                     req.finish_reason or "length", req.prompt_len,
                                     req.num_output, kvp)
            headers = {
                "x-sim-ttft": f"{(req.first_token_time or 0.0) - req.arrival:.6f}",
                "x-sim-e2e": f"{(req.finish_time or 0.0) - req.arrival:.6f}",
                "x-sim-queue-time": f"{(req.first_scheduled or req.arrival) - req.arrival:.6f}",
                "x-sim-cached-tokens": str(req.cached_tokens),
                "x-sim-preemptions": str(req.num_preemptions),
            }
            return web.Response(text=_dumps(body_out), content_type=_JSON, headers=headers)
        finally:
            if not req.finished:
                engine.abort(req)

    def _kv_transfer_params(self, req: Request) -> dict[str, Any]:
        return {"do_remote_prefill": True, "do_remote_decode": False,
                "remote_block_ids": [], "remote_engine_id": self.name,
                "remote_host": self.host, "remote_port": self.port}

    async def _stream(self, request: web.Request, gen: GenRequest, req: Request, rid: str,
                      created: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        fmt = StreamFormatter(gen.kind, rid, created, gen.model)
        seed = text_seed(rid)
        sent = 0
        first = gen.kind == "chat"
        while True:
            await req.event.wait()
            req.event.clear()
            if req.finish_reason == "abort":
                # Crash: cut the stream without [DONE], like a dying server.
                if request.transport is not None:
                    request.transport.abort()
                return resp
            n = req.num_output
            done = req.finished
            if n <= sent and not done:
                continue
            parts: list[str] = []
            if first:
                parts.append(fmt.role())
                first = False
            text = filler_text(seed, sent, n)
            req.delivered = sent = n
            if done:
                parts.append(fmt.final(text, req.finish_reason or "length"))
                if gen.include_usage:
                    parts.append(fmt.usage(req.prompt_len, n))
                parts.append(fmt.done())
                await resp.write("".join(parts).encode())
                break
            parts.append(fmt.token(text))
            await resp.write("".join(parts).encode())
        await resp.write_eof()
        return resp

    # --------------------------------------------------------------- others
    async def _models(self, request: web.Request) -> web.Response:
        cfg = self.config
        created = int(time.time())
        maxlen = cfg.profile.effective_max_model_len

        def card(mid: str, root: str, parent: str | None) -> dict[str, Any]:
            return {"id": mid, "object": "model", "created": created, "owned_by": "vllm",
                    "root": root, "parent": parent, "max_model_len": maxlen,
                    "permission": [{"id": f"modelperm-{mid}", "object": "model_permission",
                                    "created": created, "allow_create_engine": False,
                                    "allow_sampling": True, "allow_logprobs": True,
                                    "allow_search_indices": False, "allow_view": True,
                                    "allow_fine_tuning": False, "organization": "*",
                                    "group": None, "is_blocking": False}]}
        data = [card(cfg.model, cfg.model, None)]
        data += [card(a, f"/adapters/{a}", cfg.model) for a in cfg.lora_adapters]
        return web.Response(text=_dumps({"object": "list", "data": data}), content_type=_JSON)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": "0.32.0"})

    async def _metrics(self, request: web.Request) -> web.Response:
        eng, m = self.engine, self.metrics
        assert eng is not None and m is not None
        now = eng.now()
        t0, g0 = self._gen_mark
        thr = (m.generation_tokens - g0) / (now - t0) if now > t0 else 0.0
        self._gen_mark = (now, m.generation_tokens)
        used_blocks = eng.kv.num_blocks - eng.kv.num_free
        lora = bool(self.config.lora_adapters)
        text = m.render(running=len(eng.running), waiting=len(eng.waiting),
                        kv_usage=eng.kv.usage(), used_tokens=used_blocks * eng.kv.block_size,
                        total_tokens=eng.kv.num_blocks * eng.kv.block_size,
                        running_loras=eng.running_loras() if lora else (),
                        waiting_loras=eng.waiting_loras() if lora else (),
                        gen_throughput=thr)
        return web.Response(body=text.encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def _reset_prefix_cache(self, request: web.Request) -> web.Response:
        assert self.engine is not None
        self.engine.kv.reset_prefix_cache()
        return web.Response(status=200)

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())

    async def _get_faults(self, request: web.Request) -> web.Response:
        return web.json_response(self.faults.to_dict())

    async def _set_faults(self, request: web.Request) -> web.Response:
        try:
            data = await self._read_json(request)
            if not isinstance(data, dict):
                raise APIError("expected a JSON object")
            if data.get("reset"):
                self.faults.reset()
                data = {k: v for k, v in data.items() if k != "reset"}
            self.faults.update(data)
        except (APIError, ValueError) as e:
            return self._error(e if isinstance(e, APIError) else APIError(str(e)))
        return web.json_response(self.faults.to_dict())

    async def _crash_route(self, request: web.Request) -> web.Response:
        try:
            data = await self._read_json(request) if request.can_read_body else {}
        except APIError as e:
            return self._error(e)
        delay = data.get("restart_after_s") if isinstance(data, dict) else None
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, (int, float))):
            return self._error(APIError("restart_after_s must be a number"))
        # Answer first, then die: the caller learns the crash was accepted.
        def _later() -> None:
            self._crash_task = asyncio.ensure_future(self.crash(delay))
        asyncio.get_running_loop().call_later(0.01, _later)
        return web.json_response({"crashing": True, "restart_after_s": delay})

    async def _match(self, request: web.Request) -> web.Response:
        """Oracle: how many prompt tokens of this body would hit the prefix cache now, and
        the queue. The body is either an inference request, or ``{"block_hashes": [...],
        "prompt_tokens": N}`` (hashes from ``vllmsim.kvcache.block_hashes``), so an oracle
        probing many servers tokenizes and hashes a prompt once instead of once per server."""
        assert self.engine is not None
        cfg = self.config
        try:
            body = await self._read_json(request)
            if isinstance(body, dict) and isinstance(body.get("block_hashes"), list):
                n = int(body.get("prompt_tokens", 0))
                cached = self.engine.match_prefix_tokens([int(h) for h in body["block_hashes"]], n)
                return web.json_response({"prompt_tokens": n, "cached_tokens": cached,
                                          "running": len(self.engine.running), "waiting": len(self.engine.waiting)})
            kind = "chat" if isinstance(body, dict) and "messages" in body else "completion"
            gen = parse_request(body, kind, served_model=cfg.model,
                                loras=frozenset(cfg.lora_adapters), default_max_tokens=1,
                                max_model_len=1 << 30)
        except (APIError, ValueError, TypeError) as e:
            return self._error(e if isinstance(e, APIError) else APIError(str(e)))
        hashes = block_hashes(gen.token_ids, cfg.profile.block_size, gen.lora)
        cached = self.engine.match_prefix_tokens(hashes, len(gen.token_ids))
        return web.json_response({"prompt_tokens": len(gen.token_ids), "cached_tokens": cached,
                                  "running": len(self.engine.running), "waiting": len(self.engine.waiting)})


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
