"""Inference routes of a simulated server (``/v1/chat/completions``, ``/v1/completions``).

A mixin of ``SimServer`` (server.py): it reads ``self.engine``, ``self.config`` and the
server's PD settings.  Request bodies are parsed as vLLM's FastAPI front end would:
malformed JSON, JSON nested too deeply for the parser and strings with lone UTF-16
surrogates are 400s with vLLM's error object, never 500s.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .kvcache import block_hashes
from .pd import producer_params, read_remote, wants_remote_decode, wants_remote_prefill
from .protocol import (APIError, GenRequest, StreamFormatter, error_body, filler_text,
                       full_response, parse_request, text_seed)
from .request import Request

if TYPE_CHECKING:
    from .server import SimServer

_JSON = "application/json"
# A \uD800-\uDFFF escape; only bodies that have one are checked for lone surrogates.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def dumps(obj: Any) -> str:
    """Compact JSON, as FastAPI/pydantic (vLLM) writes it."""
    return json.dumps(obj, separators=(",", ":"))


def error_response(err: APIError) -> web.Response:
    return web.Response(status=err.status, text=dumps(err.body()), content_type=_JSON)


async def read_json(request: web.Request) -> Any:
    """The body as JSON, or an ``APIError`` (400) for anything vLLM would reject."""
    raw = await request.read()
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError("There was an error parsing the body") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(f"JSON decode error: {e}") from None
    if _SURROGATE_ESCAPE.search(raw):
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError("Input should be a valid string, unable to parse raw data as a "
                           "unicode string (lone surrogate)") from None
    return body


class InferenceRoutes:
    async def _chat(self: "SimServer", request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _completions(self: "SimServer", request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def _generate(self: "SimServer", request: web.Request, kind: str) -> web.StreamResponse:
        engine = self.engine
        assert engine is not None
        cfg = self.config
        try:
            gen = parse_request(await read_json(request), kind, served_model=cfg.model,
                                loras=frozenset(cfg.lora_adapters),
                                default_max_tokens=cfg.profile.default_max_tokens,
                                max_model_len=cfg.profile.effective_max_model_len)
        except APIError as e:
            return error_response(e)
        if self.faults.hang:
            await asyncio.Event().wait()  # until the client gives up (handler cancelled)
        if self.faults.should_fail(self._rng):
            status = self.faults.error_status
            return web.Response(status=status, content_type=_JSON, text=dumps(
                error_body("vllmsim injected failure", status)))
        stream_every = max(1, cfg.stream_chunk_tokens) if gen.stream else 1 << 30
        req = engine.new_request(gen.token_ids, gen.max_tokens, gen.lora, notify_every=stream_every,
                                 hashes=block_hashes(gen.token_ids, cfg.profile.block_size, gen.lora),
                                 lora_id=self.lora_id(gen.lora))
        if self.kv_transfer is not None and gen.kv_transfer_params:
            await self._kv_setup(req, gen.kv_transfer_params)
            if self.engine is not engine:  # crashed while reading remote KV
                return error_response(APIError("request aborted (server crashed)", 500))
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
                return error_response(APIError("request aborted (server crashed)", 500))
            text = filler_text(text_seed(rid), 0, req.num_output)
            kvp = producer_params(req, self.engine_id, self.host, self.side_channel_port) if req.held else None
            body_out = full_response(kind, rid, created, gen.model, text, req.finish_reason or "length",
                                     req.prompt_len, req.num_output, kvp)
            headers = {
                "x-sim-ttft": f"{(req.first_token_time or 0.0) - req.arrival:.6f}",
                "x-sim-e2e": f"{(req.finish_time or 0.0) - req.arrival:.6f}",
                "x-sim-queue-time": f"{(req.first_scheduled or req.arrival) - req.arrival:.6f}",
                "x-sim-cached-tokens": str(req.cached_tokens),
                "x-sim-preemptions": str(req.num_preemptions),
            } if cfg.sim_api else None
            return web.Response(text=dumps(body_out), content_type=_JSON, headers=headers)
        finally:
            if not req.finished:
                engine.abort(req)

    async def _kv_setup(self: "SimServer", req: Request, params: dict[str, Any]) -> None:
        """Apply a request's ``kv_transfer_params`` (see pd.py)."""
        assert self.engine is not None
        if wants_remote_decode(params):
            req.remote_decode = True
        elif wants_remote_prefill(params):
            n = await read_remote(self.client_session(), params)
            holds = self.engine.holds
            if n is not None and n == req.prompt_len:
                req.remote_prefill = True
            else:  # blocks gone or a different prompt: compute it here (vLLM: recompute)
                holds.counts["pull_failures"] += 1
                holds.counts["recomputed"] += 1

    async def _stream(self: "SimServer", request: web.Request, gen: GenRequest, req: Request,
                      rid: str, created: int) -> web.StreamResponse:
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
