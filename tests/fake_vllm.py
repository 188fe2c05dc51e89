"""A stand-in for a vLLM server running a random-weight model, for the bench's tests.

It answers every completion with HTTP 200 and a stream that ends properly but carries no
text (the sampled token decodes to nothing, as ~35 % of one-token answers of a random
model do), and records what it received: body, headers and arrival time per request.
It also serves what the bench reads from a vLLM server: ``/v1/models``, ``/metrics`` (the
families the bench uses) and ``POST /reset_prefix_cache``.

    with FakeVllm() as srv:   # listens on 127.0.0.1:<srv.port> in a background thread
        ...
        srv.received          # [(monotonic time, path, headers, body), ...]
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

from aiohttp import web

MODEL = "tiny-random"


class FakeVllm:
    def __init__(self, model: str = MODEL) -> None:
        self.model = model
        self.received: list[tuple[float, str, dict[str, str], dict]] = []
        self.resets = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    # -- routes
    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model",
                                                              "owned_by": "vllm", "max_model_len": 4096}]})

    async def metrics(self, request: web.Request) -> web.Response:
        n = len(self.received)
        lab = f'engine="0",model_name="{self.model}"'
        text = (f"vllm:num_requests_running{{{lab}}} 0.0\nvllm:num_requests_waiting{{{lab}}} 0.0\n"
                f"vllm:prefix_cache_queries_total{{{lab}}} {10.0 * n}\nvllm:prefix_cache_hits_total{{{lab}}} 0.0\n"
                f'vllm:request_success_total{{{lab},finished_reason="length"}} {float(n)}\n'
                f'vllm:cache_config_info{{block_size="16",engine="0",num_gpu_blocks="1024"}} 1.0\n')
        return web.Response(text=text)

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def reset(self, request: web.Request) -> web.Response:
        self.resets += 1
        return web.json_response({"success": True})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.received.append((time.monotonic(), request.path, dict(request.headers), body))
        chat = request.path.endswith("chat/completions")
        r = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await r.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"

        async def send(choices: list, **extra) -> None:
            doc = {"id": "x", "object": obj, "created": 0, "model": self.model, "choices": choices, **extra}
            await r.write(b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n")

        if chat:
            await send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        await asyncio.sleep(0.01)
        part = {"delta": {"content": ""}} if chat else {"text": ""}
        await send([{"index": 0, **part, "finish_reason": "length"}])
        await send([], usage={"prompt_tokens": 7, "total_tokens": 8, "completion_tokens": 1})
        await r.write(b"data: [DONE]\n\n")
        return r

    # -- lifecycle
    async def _main(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/health", self.health)
        app.router.add_post("/reset_prefix_cache", self.reset)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_post("/v1/completions", self.generate)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def __enter__(self) -> "FakeVllm":
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fake vLLM did not start")
        return self

    def __exit__(self, *exc) -> None:
        assert self._loop is not None and self._stop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"
