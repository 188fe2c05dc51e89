"""The PD sidecar: an HTTP proxy in front of one decode server that runs vLLM's
NixlConnector flow for requests ai-lb disaggregated (vLLM's ``toy_proxy_server.py``,
llm-d's routing sidecar).

For ``POST /v1/chat/completions`` and ``/v1/completions`` carrying ``x-prefiller-host-port``
(set by ai-lb alone; the reference Envoy strips any client's):

1. the request goes to that prefill server with ``max_tokens: 1`` (and
   ``max_completion_tokens: 1`` if given), ``stream: false``, no ``stream_options``, and
   ``kv_transfer_params: {do_remote_decode: true, do_remote_prefill: false, remote_*: null}``;
2. the original request goes to the local decode server with the ``kv_transfer_params`` the
   prefill answer carried: the decode server reads the prompt's KV instead of computing it;
3. the decode server's answer, streamed or not, passes through untouched (status, headers
   but hop-by-hop ones, bytes as they come).

If the prefill fails (connect error, timeout, non-200, no ``kv_transfer_params``, a header
that is not a literal ``ip:port`` or not in ``--prefill-allow``), the request is decoded
locally, as a mixed server would: counted by reason and logged (rate-limited), never
failed. A client's own ``kv_transfer_params`` are removed (they would make the decode
server read KV from a host the client names). Every other path passes through to the
decode server (``/health``, ``/metrics``, ``/v1/models``, ...); the sidecar's own metrics
are at ``/pd-sidecar/metrics``. Each response says what happened in ``x-pd-prefill``
(the prefill server, ``none`` or ``failed``).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from ..telemetry import RateLimitedLog

log = logging.getLogger("ai_lb.pd_sidecar")

PREFILL_HEADER = "x-prefiller-host-port"
RESULT_HEADER = "x-pd-prefill"
PD_PATHS = ("/v1/chat/completions", "/v1/completions")
METRICS_PATH = "/pd-sidecar/metrics"
REMOTE_DECODE = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                 "remote_block_ids": None, "remote_host": None, "remote_port": None}
HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "trailers", "transfer-encoding", "upgrade", "host", "content-length", PREFILL_HEADER))
KEEPALIVE_S = 3.0  # under uvicorn's 5 s (vLLM's server): a pooled connection is never one it is closing


@dataclass(frozen=True)
class SidecarConfig:
    listen: str = "127.0.0.1:8000"
    decode: str = "http://127.0.0.1:8200"      # the local decode server
    prefill_timeout: float = 60.0              # seconds for the whole prefill request
    connect_timeout: float = 5.0
    allow: tuple[Any, ...] = field(default=())  # ip networks and (ip, port) pairs; empty: any address
    max_body_bytes: int = 32 << 20


def parse_allow(items: list[str]) -> tuple[Any, ...]:
    """``10.0.0.0/8``, ``10.0.0.7`` or ``10.0.0.7:8000`` (``[v6]:port``) entries; ValueError on a bad one."""
    out: list[Any] = []
    for raw in items:
        s = raw.strip()
        host, sep, port = s.rpartition(":")
        if sep and port.isdigit() and (s.startswith("[") or host.count(":") == 0):
            out.append((ipaddress.ip_address(host.strip("[]")), int(port)))
        else:
            out.append(ipaddress.ip_network(s, strict=False))
    return tuple(out)


def prefill_target(value: str, allow: tuple[Any, ...]) -> tuple[str | None, str]:
    """(``host:port`` to send the prefill to, or None) and the reason it is refused."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None, "bad_header"
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None, "bad_header"  # a name would be resolved here: only literal addresses
    if allow and not any((ip, int(port)) == a if isinstance(a, tuple) else ip in a for a in allow):
        return None, "not_allowed"
    return (f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"), ""


def _error(status: int, msg: str) -> web.Response:
    return web.Response(status=status, content_type="application/json", body=orjson.dumps(
        {"error": {"message": msg, "type": "BadGatewayError" if status == 502 else "BadRequestError",
                   "param": None, "code": status}}))


class Sidecar:
    def __init__(self, cfg: SidecarConfig, registry: CollectorRegistry | None = None) -> None:
        self.cfg = cfg
        self.decode = cfg.decode if "://" in cfg.decode else f"http://{cfg.decode}"
        self.registry = registry or CollectorRegistry()
        self.requests = Counter("ai_lb_pd_sidecar_requests", "Generation requests by how their prompt was computed: "
                                "disaggregated (by the named prefill server), local (no prefill server named), "
                                "prefill_failed (named, failed, computed locally).", ["outcome"],
                                registry=self.registry)
        self.failures = Counter("ai_lb_pd_sidecar_prefill_failures", "Failed prefills by reason (the request was "
                                "decoded locally).", ["reason"], registry=self.registry)
        self.prefill_seconds = Histogram("ai_lb_pd_sidecar_prefill_seconds", "Time of successful prefill requests.",
                                         registry=self.registry,
                                         buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.client_params = Counter("ai_lb_pd_sidecar_client_kv_params", "Requests whose client-supplied "
                                     "kv_transfer_params were removed.", registry=self.registry)
        self.session: ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._log = RateLimitedLog(10.0)
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes)
        app.router.add_get(METRICS_PATH, self._metrics)
        for p in PD_PATHS:
            app.router.add_post(p, self._generate)
        app.router.add_route("*", "/{tail:.*}", self._passthrough)
        return app

    async def start(self) -> int:
        self.session = ClientSession(connector=TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S),
                                     auto_decompress=False)
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        host, _, port = self.cfg.listen.rpartition(":")
        site = web.TCPSite(self._runner, host.strip("[]"), int(port), reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("pd-sidecar on %s:%d in front of %s (prefill servers: %s)", host, self.port, self.decode,
                 "the allow list" if self.cfg.allow else "any address named by ai-lb")
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), content_type="text/plain")

    @staticmethod
    def _headers(request: web.Request) -> dict[str, str]:
        return {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            doc = orjson.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):  # not ours to fix: the decode server answers it
            return await self._forward(request, body, "none")
        if "kv_transfer_params" in doc:
            doc.pop("kv_transfer_params")
            self.client_params.inc()
        named = request.headers.get(PREFILL_HEADER)
        kvp, result = None, "none"
        if named is None:
            self.requests.labels("local").inc()
        else:
            target, why = prefill_target(named, self.cfg.allow)
            if target is not None:
                kvp, why = await self._prefill(request, target, doc)
            if kvp is None:
                self._failed(why, named)
                result = "failed"
            else:
                self.requests.labels("disaggregated").inc()
                result = target
        if kvp is not None:
            doc["kv_transfer_params"] = kvp
        return await self._forward(request, orjson.dumps(doc), result)

    def _failed(self, reason: str, named: str) -> None:
        self.requests.labels("prefill_failed").inc()
        self.failures.labels(reason).inc()
        self._log.warn(("prefill", reason), "prefill on %.60s failed (%s): decoding locally", named, reason)

    async def _prefill(self, request: web.Request, target: str, doc: dict) -> tuple[dict | None, str]:
        pre = dict(doc, max_tokens=1, stream=False, kv_transfer_params=REMOTE_DECODE)
        if "max_completion_tokens" in pre:
            pre["max_completion_tokens"] = 1
        pre.pop("stream_options", None)
        t0 = time.perf_counter()
        assert self.session is not None
        try:
            async with self.session.post(f"http://{target}{request.path}", data=orjson.dumps(pre),
                                         headers={**self._headers(request), "Content-Type": "application/json"},
                                         timeout=ClientTimeout(total=self.cfg.prefill_timeout,
                                                               sock_connect=self.cfg.connect_timeout)) as r:
                raw = await r.read()
                if r.status != 200:
                    return None, f"status_{r.status}"
        except TimeoutError:
            return None, "timeout"
        except (ClientError, OSError):
            return None, "connect"
        try:
            kvp = orjson.loads(raw).get("kv_transfer_params")
        except (ValueError, AttributeError):
            return None, "bad_answer"
        if not isinstance(kvp, dict):
            return None, "no_kv_params"
        self.prefill_seconds.observe(time.perf_counter() - t0)
        return kvp, ""

    async def _passthrough(self, request: web.Request) -> web.StreamResponse:
        return await self._forward(request, await request.read(), None)

    async def _forward(self, request: web.Request, body: bytes, result: str | None) -> web.StreamResponse:
        """Send to the decode server; its answer goes back as it comes."""
        assert self.session is not None
        headers = self._headers(request)
        url = self.decode + request.path_qs
        try:
            up = await self.session.request(request.method, url, data=body if body else None, headers=headers,
                                            timeout=ClientTimeout(total=None, sock_connect=self.cfg.connect_timeout))
        except (ClientError, OSError, TimeoutError) as e:
            self._log.warn(("decode", type(e).__name__), "decode server %s unreachable: %s", self.decode,
                           type(e).__name__)
            return _error(502, "the decode server behind the PD sidecar is unreachable")
        try:
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in up.headers.items():
                if k.lower() not in HOP_BY_HOP:
                    resp.headers.add(k, v)
            if result is not None:
                resp.headers[RESULT_HEADER] = result
            if up.content_length is not None:
                resp.content_length = up.content_length
            await resp.prepare(request)
            try:
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
            except (ClientError, OSError):  # the decode server cut its answer: so do we, as it did
                if request.transport is not None:
                    request.transport.abort()
                return resp
            await resp.write_eof()
            return resp
        finally:
            up.release()
