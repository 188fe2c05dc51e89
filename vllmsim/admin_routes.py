"""Non-inference routes of a simulated server: vLLM's (models, health, metrics, cache
reset), SGLang's ``/flush_cache`` in SGLang mode, and the simulator's ``/sim/*``.

A mixin of ``SimServer`` (server.py).
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .handlers import dumps, error_response, read_json
from .kvcache import block_hashes
from .protocol import APIError, parse_request

if TYPE_CHECKING:
    from .server import SimServer

_JSON = "application/json"
SGLANG_FLUSHED = ("Cache flushed.\nPlease check backend logs for more details. (When there are "
                  "running or waiting requests, the operation will not be performed.)\n")


class AdminRoutes:
    async def _models(self: "SimServer", request: web.Request) -> web.Response:
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
        return web.Response(text=dumps({"object": "list", "data": data}), content_type=_JSON)

    async def _health(self: "SimServer", request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _version(self: "SimServer", request: web.Request) -> web.Response:
        return web.json_response({"version": "0.32.0"})

    async def _metrics(self: "SimServer", request: web.Request) -> web.Response:
        eng, m = self.engine, self.metrics
        assert eng is not None and m is not None
        eng.holds.expire()
        now = eng.now()
        t0, g0 = self._gen_mark
        thr = (m.generation_tokens - g0) / (now - t0) if now > t0 else 0.0
        self._gen_mark = (now, m.generation_tokens)
        kv = eng.kv
        lora = bool(self.config.lora_adapters)
        deferred = len(eng.sched.transferring)
        text = m.render(running=len(eng.running), waiting=len(eng.waiting) + deferred,
                        deferred=deferred, kv_usage=kv.usage(),
                        used_tokens=(kv.num_blocks - kv.num_free) * kv.block_size,
                        total_tokens=kv.num_blocks * kv.block_size,
                        running_loras=eng.running_loras() if lora else (),
                        waiting_loras=eng.waiting_loras() if lora else (),
                        gen_throughput=thr)
        return web.Response(body=text.encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    def _reset_cache(self: "SimServer") -> bool:
        assert self.engine is not None
        self.engine.holds.expire()
        return self.engine.kv.reset_prefix_cache()

    async def _reset_prefix_cache(self: "SimServer", request: web.Request) -> web.Response:
        """vLLM: ``{"success": true}``; false while blocks are in use (nothing is reset)."""
        return web.Response(text=dumps({"success": self._reset_cache()}), content_type=_JSON)

    async def _flush_cache(self: "SimServer", request: web.Request) -> web.Response:
        """SGLang's ``/flush_cache`` (refused with 400 while requests are running)."""
        ok = self._reset_cache()
        return web.Response(status=200 if ok else 400, text=SGLANG_FLUSHED if ok else
                            "Cache not flushed because there are pending requests.\n")

    async def _state(self: "SimServer", request: web.Request) -> web.Response:
        return web.json_response(self.state())

    async def _get_faults(self: "SimServer", request: web.Request) -> web.Response:
        return web.json_response(self.faults.to_dict())

    async def _set_faults(self: "SimServer", request: web.Request) -> web.Response:
        try:
            data = await read_json(request)
            if not isinstance(data, dict):
                raise APIError("expected a JSON object")
            if data.get("reset"):
                self.faults.reset()
                data = {k: v for k, v in data.items() if k != "reset"}
            self.faults.update(data)
        except (APIError, ValueError) as e:
            return error_response(e if isinstance(e, APIError) else APIError(str(e)))
        return web.json_response(self.faults.to_dict())

    async def _crash_route(self: "SimServer", request: web.Request) -> web.Response:
        try:
            data = await read_json(request) if request.can_read_body else {}
        except APIError as e:
            return error_response(e)
        delay = data.get("restart_after_s") if isinstance(data, dict) else None
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, (int, float))):
            return error_response(APIError("restart_after_s must be a number"))

        # Answer first, then die: the caller learns the crash was accepted.
        def _later() -> None:
            self._crash_task = asyncio.ensure_future(self.crash(delay))
        asyncio.get_running_loop().call_later(0.01, _later)
        return web.json_response({"crashing": True, "restart_after_s": delay})

    async def _match(self: "SimServer", request: web.Request) -> web.Response:
        """Oracle: how many prompt tokens of this body would hit the prefix cache now, and
        the queue. The body is either an inference request, or ``{"block_hashes": [...],
        "prompt_tokens": N}`` (hashes from ``vllmsim.kvcache.block_hashes``), so an oracle
        probing many servers tokenizes and hashes a prompt once instead of once per server."""
        eng = self.engine
        assert eng is not None
        cfg = self.config
        try:
            body = await read_json(request)
            if isinstance(body, dict) and isinstance(body.get("block_hashes"), list):
                n = int(body.get("prompt_tokens", 0))
                hashes = [int(h) for h in body["block_hashes"]]
            else:
                kind = "chat" if isinstance(body, dict) and "messages" in body else "completion"
                gen = parse_request(body, kind, served_model=cfg.model,
                                    loras=frozenset(cfg.lora_adapters), default_max_tokens=1,
                                    max_model_len=1 << 30)
                n = len(gen.token_ids)
                hashes = block_hashes(gen.token_ids, cfg.profile.block_size, gen.lora)
        except (APIError, ValueError, TypeError) as e:
            return error_response(e if isinstance(e, APIError) else APIError(str(e)))
        return web.json_response({"prompt_tokens": n, "cached_tokens": eng.match_prefix_tokens(hashes, n),
                                  "running": len(eng.running), "waiting": len(eng.waiting)})
