"""A reference router that knows every simulated server's true prefix cache and queue.

Not a load balancer anyone could deploy: before each request it asks *every* backend, at
once, how many prompt tokens would hit its prefix cache right now and how many requests it
runs and queues (``POST /sim/match``), and sends the request where the estimated time to
first token is lowest. The prompt is tokenized and block-hashed once, here, with the
simulator's own code, and only the hashes are sent: probing is a dictionary lookup per
block on each server instead of a tokenization per server (which, at 8 servers, made the
probes cost the simulators more CPU than the traffic). It is the "what a perfectly informed router
would do" line in the benchmark, so the other systems can be read against it.

Estimated TTFT on backend *b*, in simulated milliseconds (constants from the default profile
``vllmsim/profiles/h100-8b.yaml``; only the ranking matters, so the time scale is irrelevant)::

    ttft(b) = PREFILL_MS * (pending_prefill(b) + uncached)     # prefill work ahead of us + ours
            + WAITING_MS * waiting(b)                         # requests not even admitted yet
            + DECODE_SEQ_MS * running(b)                       # every running seq slows each step
            + BASE_MS                                          # one step

* ``uncached = prompt_tokens - cached_tokens`` (from ``/sim/match``).
* ``pending_prefill(b)``: the uncached tokens of the requests this oracle has sent to *b* that have
  not produced their first byte yet (first chunk of a stream; the whole answer when not
  streaming). The simulator's state says *how many* requests run, not how much prefill is left;
  the oracle, being the only router, knows the rest. This also stops a burst of simultaneous
  requests from all seeing the same idle backend and piling onto it.
* ``waiting(b)``: requests the engine could not admit (KV cache or ``max_num_seqs`` full): each
  one is charged like a typical 1000-token prefill.

Ties go to the backend with the fewest of our in-flight requests, then round robin. A backend whose
probes fail is skipped; if all fail the request goes round robin, and ``/oracle/stats`` counts it
(``probe_failures``): the harness then reports the oracle's row as degraded, never ``ok``.

It refuses to start unless every backend answers ``GET /sim/state`` (a real vLLM or SGLang server,
or the simulator with ``--no-sim-api``, cannot tell it its cache).

Everything else is a transparent reverse proxy: the status, content type and body (SSE included,
chunk by chunk) come back unchanged, plus ``x-oracle-pick: <ip:port>``.

    python -m aibench.oracle --port 19000 --backends 127.0.0.1:18000,127.0.0.1:18001
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

log = logging.getLogger("aibench.oracle")

BASE_MS = 6.5          # base_ms: one engine step
PREFILL_MS = 0.06      # per_prefill_token_ms
DECODE_SEQ_MS = 0.045  # per_decode_seq_ms
WAITING_MS = 1000 * PREFILL_MS  # a not-yet-admitted request: about a 1000-token prefill

PROBE_TIMEOUT_S = 2.0
INFERENCE_PATHS = ("/v1/chat/completions", "/v1/completions")
# Hop-by-hop and framing headers: never copied through the proxy.
_SKIP_REQ = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade",
             "proxy-connection", "te", "trailer"}
_SKIP_RESP = {"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade",
              "proxy-connection", "te", "trailer", "content-encoding", "server", "date"}


@dataclass
class BackendView:
    """What the oracle learnt about one backend for one request."""

    addr: str
    ok: bool = False
    prompt_tokens: int = 0
    cached_tokens: int = 0
    running: int = 0
    waiting: int = 0
    ttft_ms: float = float("inf")


@dataclass
class Oracle:
    backends: list[str]
    pending_prefill: dict[str, int] = field(default_factory=dict)
    inflight: dict[str, int] = field(default_factory=dict)
    picks: dict[str, int] = field(default_factory=dict)
    fallbacks: int = 0          # requests sent round robin (no body to probe, or every probe failed)
    decisions: int = 0          # inference requests probed
    probe_failures: int = 0     # ... of which every probe failed
    block_size: int = 16   # the simulators' KV block size (read from /sim/state at open)
    _rr: Any = None
    session: aiohttp.ClientSession | None = None
    probe_session: aiohttp.ClientSession | None = None

    def __post_init__(self) -> None:
        for b in self.backends:
            self.pending_prefill.setdefault(b, 0)
            self.inflight.setdefault(b, 0)
            self.picks.setdefault(b, 0)
        self._rr = itertools.cycle(self.backends)

    async def open(self) -> None:
        # No total timeout: a long generation must never be cut by the proxy.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5), auto_decompress=False)
        self.probe_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S))
        for b in self.backends:  # block hashes must be computed at the servers' block size
            try:
                async with self.probe_session.get(f"http://{b}/sim/state") as r:
                    state = await r.json(content_type=None) if r.status == 200 else None
                if isinstance(state, dict) and "block_size" in state:
                    self.block_size = int(state["block_size"])
                    break
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, TypeError):
                continue

    async def close(self) -> None:
        for s in (self.session, self.probe_session):
            if s is not None:
                await s.close()

    # ----------------------------------------------------------------- decision
    async def _probe(self, addr: str, probe: bytes) -> BackendView:
        v = BackendView(addr)
        assert self.probe_session is not None
        try:
            async with self.probe_session.post(f"http://{addr}/sim/match", data=probe,
                                               headers={"Content-Type": "application/json"}) as r:
                m = await r.json(content_type=None) if r.status == 200 else {}
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            log.debug("probe %s failed: %s", addr, e)
            return v
        if not m:
            return v
        v.ok = True
        v.prompt_tokens = int(m.get("prompt_tokens", 0) or 0)
        v.cached_tokens = int(m.get("cached_tokens", 0) or 0)
        v.running = int(m.get("running", 0) or 0)
        v.waiting = int(m.get("waiting", 0) or 0)
        v.ttft_ms = estimate_ttft_ms(v.prompt_tokens - v.cached_tokens, self.pending_prefill[addr],
                                     v.running, v.waiting)
        return v

    def probe_body(self, body: bytes) -> bytes:
        """The request's block hashes, computed once with the simulator's tokenizer and
        hashing (falls back to sending the request itself if it cannot be parsed here)."""
        import json

        from vllmsim.kvcache import block_hashes
        from vllmsim.protocol import parse_request

        try:
            doc = json.loads(body)
            kind = "chat" if isinstance(doc, dict) and "messages" in doc else "completion"
            model = doc.get("model", "") if isinstance(doc, dict) else ""
            gen = parse_request(doc, kind, served_model=model, loras=frozenset(), default_max_tokens=1,
                                max_model_len=1 << 30)
        except Exception:  # noqa: BLE001 - let the servers parse (and reject) it themselves
            return body
        hashes = block_hashes(gen.token_ids, self.block_size, gen.lora)
        return json.dumps({"block_hashes": hashes, "prompt_tokens": len(gen.token_ids)}).encode()

    async def choose(self, body: bytes | None) -> tuple[str, int]:
        """(backend, uncached tokens charged to it) for one request."""
        if body is None:
            self.fallbacks += 1
            return next(self._rr), 0
        self.decisions += 1
        probe = self.probe_body(body)
        views = await asyncio.gather(*(self._probe(b, probe) for b in self.backends))
        ok = [v for v in views if v.ok]
        if not ok:
            self.fallbacks += 1
            self.probe_failures += 1
            return next(self._rr), 0
        start = next(self._rr)  # rotating tie-break
        order = {b: (i - self.backends.index(start)) % len(self.backends) for i, b in enumerate(self.backends)}
        best = min(ok, key=lambda v: (round(v.ttft_ms, 6), self.inflight[v.addr], order[v.addr]))
        return best.addr, max(0, best.prompt_tokens - best.cached_tokens)

    # ----------------------------------------------------------------- proxy
    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path in ("/health", "/oracle/health") and request.method == "GET":
            return web.Response(text="OK")
        if request.path == "/oracle/stats":
            return web.json_response({"picks": self.picks, "inflight": self.inflight,
                                      "pending_prefill": self.pending_prefill, "fallbacks": self.fallbacks,
                                      "decisions": self.decisions, "probe_failures": self.probe_failures})
        body = await request.read()
        is_inference = request.method == "POST" and request.path in INFERENCE_PATHS and body
        addr, charged = await self.choose(body if is_inference else None)
        self.picks[addr] += 1
        self.inflight[addr] += 1
        self.pending_prefill[addr] += charged
        released = False

        def release_prefill() -> None:
            nonlocal released
            if not released:
                released = True
                self.pending_prefill[addr] -= charged

        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIP_REQ}
        assert self.session is not None
        try:
            try:
                upstream = await self.session.request(request.method, f"http://{addr}{request.path_qs}",
                                                      data=body or None, headers=headers, allow_redirects=False)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                return web.json_response({"error": {"message": f"oracle: backend {addr} failed: {e}",
                                                    "type": "bad_gateway", "code": 502}},
                                         status=502, headers={"x-oracle-pick": addr})
            async with upstream:
                resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for k, v in upstream.headers.items():
                    if k.lower() not in _SKIP_RESP:
                        resp.headers.add(k, v)
                resp.headers["x-oracle-pick"] = addr
                if upstream.headers.get("Content-Length") is not None:
                    resp.content_length = int(upstream.headers["Content-Length"])
                await resp.prepare(request)
                try:
                    async for chunk in upstream.content.iter_any():
                        release_prefill()  # first byte: our prefill is done
                        await resp.write(chunk)
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    log.warning("backend %s broke mid-response: %s", addr, e)
                    return resp  # the client sees a truncated body, as it would behind any proxy
                await resp.write_eof()
                return resp
        finally:
            release_prefill()
            self.inflight[addr] -= 1


def estimate_ttft_ms(uncached: int, pending_prefill: int, running: int, waiting: int) -> float:
    """The oracle's estimated time to first token in simulated milliseconds (see module doc)."""
    return (PREFILL_MS * (max(0, pending_prefill) + max(0, uncached)) + WAITING_MS * waiting
            + DECODE_SEQ_MS * running + BASE_MS)


def make_app(oracle: Oracle) -> web.Application:
    app = web.Application(client_max_size=256 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", oracle.handle)

    async def on_start(_: web.Application) -> None:
        await oracle.open()

    async def on_stop(_: web.Application) -> None:
        await oracle.close()

    app.on_startup.append(on_start)
    app.on_cleanup.append(on_stop)
    return app


async def not_simulators(backends: list[str], timeout: float = 5.0) -> list[str]:
    """The backends that do not answer ``GET /sim/state`` (so are not simulators with their API on)."""
    bad = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        for b in backends:
            try:
                async with s.get(f"http://{b}/sim/state") as r:
                    ok = r.status == 200 and "block_size" in await r.text()
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                ok = False
            if not ok:
                bad.append(b)
    return bad


REFUSAL = ("the oracle needs the simulator's /sim/* API on every backend, and {bad} lack it (a real "
           "vLLM/SGLang server, or vllmsim --no-sim-api): it cannot see their caches, so it refuses to run")


async def serve(host: str, port: int, backends: list[str]) -> None:
    bad = await not_simulators(backends)
    if bad:
        print("oracle: " + REFUSAL.format(bad=", ".join(bad)), file=sys.stderr, flush=True)
        raise SystemExit(2)
    oracle = Oracle(backends)
    runner = web.AppRunner(make_app(oracle), access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    log.warning("oracle on http://%s:%d in front of %s", host, port, ",".join(backends))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aibench.oracle", description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--backends", required=True, help="comma-separated ip:port of simulated vLLM servers")
    ap.add_argument("--log-level", default="WARNING")
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    if not backends:
        ap.error("--backends is empty")
    try:
        import uvloop  # type: ignore[import-not-found]

        run = uvloop.run
    except (ImportError, AttributeError):
        run = asyncio.run
    run(serve(a.host, a.port, backends))
    return 0


if __name__ == "__main__":
    sys.exit(main())
