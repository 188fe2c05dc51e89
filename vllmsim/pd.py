"""Disaggregated prefill/decode as vLLM's NixlConnector does it (``--kv-transfer-config``).

Per request, on any server started with a kv-transfer config:

* ``kv_transfer_params.do_remote_decode`` (a proxy's prefill request): the prompt is
  computed as usual; when the request finishes its blocks stay referenced (not
  evictable) and the answer carries ``kv_transfer_params`` naming them
  (``remote_engine_id``, ``remote_request_id``, ``remote_block_ids``, ``remote_host``,
  ``remote_port``).  A decode server's read frees them, and so does the abort timeout
  (vLLM's ``VLLM_NIXL_ABORT_REQUEST_TIMEOUT``, 480 s; simulated seconds here);
* ``do_remote_prefill`` with ``remote_host``/``remote_port``: the server reads the
  blocks from that prefill server's side channel, then charges
  ``kv_transfer_per_token_ms`` per transferred token instead of computing the prompt.
  If the blocks are gone (timed out, server restarted or down) it recomputes the prompt
  locally, as vLLM's default ``kv_load_failure_policy`` does.

The side channel (NIXL's metadata/notification channel in vLLM) is a small HTTP server
per simulated server on its own port (``remote_port``), so it works across processes
and leaves the OpenAI port looking like plain vLLM.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from aiohttp import ClientError, ClientSession, ClientTimeout, web

from .kvcache import KVCache
from .request import Request

log = logging.getLogger("vllmsim.pd")

DEFAULT_ABORT_TIMEOUT_S = float(os.environ.get("VLLM_NIXL_ABORT_REQUEST_TIMEOUT", "480"))
KV_ROLES = ("kv_producer", "kv_consumer", "kv_both")
READ_PATH = "/kv/read"


@dataclass(frozen=True)
class KVTransferConfig:
    """vLLM's ``KVTransferConfig`` keys (only ``kv_role`` and the side channel matter here)."""

    kv_connector: str | None = "NixlConnector"
    engine_id: str | None = None
    kv_buffer_device: str = "cuda"
    kv_buffer_size: float = 1e9
    kv_role: str | None = "kv_both"
    kv_rank: int | None = None
    kv_parallel_size: int = 1
    kv_ip: str = "127.0.0.1"
    kv_port: int = 14579
    kv_connector_extra_config: dict[str, Any] = field(default_factory=dict)
    kv_connector_module_path: str | None = None
    enable_permute_local_kv: bool = False
    kv_load_failure_policy: str = "recompute"

    def __post_init__(self) -> None:
        if self.kv_role not in KV_ROLES:
            raise ValueError(f"kv_role must be one of {KV_ROLES}, not {self.kv_role!r}")

    @classmethod
    def from_json(cls, text: str | dict[str, Any]) -> "KVTransferConfig":
        data = json.loads(text) if isinstance(text, str) else dict(text)
        if not isinstance(data, dict):
            raise ValueError("--kv-transfer-config must be a JSON object")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown kv-transfer-config keys: {sorted(unknown)}")
        return cls(**data)

    def side_channel_port(self, index: int) -> int:
        """``kv_connector_extra_config.side_channel_port`` or ``VLLM_NIXL_SIDE_CHANNEL_PORT``
        plus the server index; 0 (the default) picks a free port."""
        base = int(self.kv_connector_extra_config.get(
            "side_channel_port", os.environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT", 0)))
        return base + index if base else 0


class HeldBlocks:
    """Blocks of finished prefill requests kept for a decode server to read."""

    def __init__(self, kv: KVCache, now: Callable[[], float], timeout_s: float,
                 on_free: Callable[[], None]) -> None:
        self.kv, self.now, self.timeout_s, self.on_free = kv, now, timeout_s, on_free
        self.held: dict[str, tuple[Request, float]] = {}  # request id -> (request, expiry)
        self.counts = {"held": 0, "pulled": 0, "expired": 0, "pull_failures": 0, "recomputed": 0}

    def hold(self, req: Request) -> None:
        self.held[req.id] = (req, self.now() + self.timeout_s)
        self.counts["held"] += 1

    def next_expiry(self) -> float | None:
        return min((e for _, e in self.held.values()), default=None)

    def expire(self) -> None:
        if not self.held:
            return
        now = self.now()
        for rid, (_, expiry) in list(self.held.items()):
            if expiry <= now:
                self._release(rid)
                self.counts["expired"] += 1

    def _release(self, rid: str) -> Request:
        req, _ = self.held.pop(rid)
        self.kv.free(req.blocks)
        req.blocks = []
        req.held = False
        self.on_free()  # blocks became free: waiting requests may fit now
        return req

    def read(self, rid: str, block_ids: list[int]) -> int | None:
        """A decode server reads a held request's KV: its prompt length, or None if gone."""
        self.expire()
        entry = self.held.get(rid)
        if entry is None or list(entry[0].blocks) != [int(b) for b in block_ids]:
            return None
        self.counts["pulled"] += 1
        return self._release(rid).prompt_len

    def num_blocks(self) -> int:
        return sum(len(r.blocks) for r, _ in self.held.values())

    def stats(self) -> dict[str, int]:
        return dict(self.counts, holding=len(self.held))


def producer_params(req: Request, engine_id: str, host: str, port: int) -> dict[str, Any]:
    """The ``kv_transfer_params`` a prefill answer carries (vLLM's ``request_finished``)."""
    return {"do_remote_prefill": True, "do_remote_decode": False,
            "remote_block_ids": list(req.blocks), "remote_engine_id": engine_id,
            "remote_request_id": req.id, "remote_host": host, "remote_port": port, "tp_size": 1}


class SideChannel:
    """The per-server HTTP side channel decode servers read held blocks through."""

    def __init__(self, host: str, port: int, resolve: Callable[[str], HeldBlocks | None]) -> None:
        self.host, self.port, self._resolve = host, port, resolve
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(READ_PATH, self._read)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._runner = runner

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _read(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
            holds = self._resolve(str(body["remote_engine_id"]))
            n = holds.read(str(body["remote_request_id"]), list(body["remote_block_ids"])) if holds else None
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "bad read request"}, status=400)
        if n is None:
            return web.json_response({"error": "blocks not held"}, status=404)
        return web.json_response({"num_tokens": n})


async def read_remote(session: ClientSession, params: dict[str, Any], timeout_s: float = 5.0) -> int | None:
    """Read a prefill server's held blocks; the prompt length, or None when unavailable."""
    url = f"http://{params['remote_host']}:{int(params['remote_port'])}{READ_PATH}"
    body = {k: params.get(k) for k in ("remote_engine_id", "remote_request_id", "remote_block_ids")}
    try:
        async with session.post(url, json=body, timeout=ClientTimeout(total=timeout_s)) as r:
            if r.status != 200:
                return None
            return int((await r.json())["num_tokens"])
    except (ClientError, OSError, ValueError, KeyError, TimeoutError) as e:
        log.info("KV read from %s failed: %s", url, e)
        return None


def wants_remote_prefill(params: Any) -> bool:
    return (isinstance(params, dict) and bool(params.get("do_remote_prefill"))
            and bool(params.get("remote_host")) and params.get("remote_port") is not None
            and params.get("remote_request_id") is not None)


def wants_remote_decode(params: Any) -> bool:
    return isinstance(params, dict) and bool(params.get("do_remote_decode"))
