"""vLLM's KV-cache event stream over ZeroMQ (``--kv-events-config``).

Same configuration keys and defaults as vLLM's ``KVEventsConfig`` and the same wire
format as its ``ZmqEventPublisher`` (checked against a vLLM 0.32 capture):

* PUB socket; multipart messages ``[topic, seq (8-byte big-endian, from 0 per
  publisher), msgpack([ts, events, data_parallel_rank])]``, events being vLLM's maps
  tagged by ``"type"`` (built by ``kvcache.KVCache``);
* socket role by vLLM's heuristic: ``endpoint`` with ``*`` or ``::``, or an ``ipc://``
  or ``inproc://`` address, is *bound*; a concrete TCP host is *connected to* (the
  subscriber binds).  Messages sent before a subscriber is connected are lost;
* ``replay_endpoint`` (always bound) is a ROUTER: a client sends ``[b"", start_seq (8
  bytes)]`` from a DEALER and gets ``[b"", seq, payload]`` for every buffered batch with
  ``seq >= start_seq`` (the last ``buffer_steps`` batches), then ``[b"", -1 (8 bytes,
  signed), b""]``.

Several servers in one process: server ``i`` offsets the port of both endpoints by
``i`` (vLLM's ``offset_endpoint_port``, which it applies per data-parallel rank), and
``{index}``, ``{port}``, ``{host}`` and ``{model}`` in ``topic`` are replaced by the
server's values.  ``data_parallel_rank`` is always 0.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("vllmsim.kv_events")

END_SEQ = (-1).to_bytes(8, "big", signed=True)


@dataclass(frozen=True)
class KVEventsConfig:
    """vLLM's ``KVEventsConfig`` (same keys, same defaults)."""

    enable_kv_cache_events: bool = False
    publisher: str | None = None  # "null" | "zmq"; default: zmq when enabled
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""

    def __post_init__(self) -> None:
        if self.publisher is None:
            object.__setattr__(self, "publisher", "zmq" if self.enable_kv_cache_events else "null")
        if self.publisher not in ("null", "zmq"):
            raise ValueError(f"kv-events publisher must be 'null' or 'zmq', not {self.publisher!r}")

    @classmethod
    def from_json(cls, text: str | dict[str, Any]) -> "KVEventsConfig":
        data = json.loads(text) if isinstance(text, str) else dict(text)
        if not isinstance(data, dict):
            raise ValueError("--kv-events-config must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown kv-events-config keys: {sorted(unknown)}")
        return cls(**data)

    @property
    def enabled(self) -> bool:
        return self.enable_kv_cache_events and self.publisher == "zmq"

    def for_server(self, index: int, host: str, port: int, model: str) -> "KVEventsConfig":
        """This config as server ``index`` of a process uses it."""
        topic = (self.topic.replace("{index}", str(index)).replace("{port}", str(port))
                 .replace("{host}", host).replace("{model}", model))
        return dataclasses.replace(self, endpoint=offset_endpoint_port(self.endpoint, index),
                                   replay_endpoint=offset_endpoint_port(self.replay_endpoint, index),
                                   topic=topic)


def offset_endpoint_port(endpoint: str | None, offset: int) -> str | None:
    """vLLM's rule: add ``offset`` to a TCP port, suffix an inproc name, keep ipc paths."""
    if not endpoint or offset == 0:
        return endpoint
    if "inproc" in endpoint:
        return f"{endpoint}_dp{offset}"
    if endpoint.startswith("ipc://"):
        return f"{endpoint}_{offset}"
    if "tcp" in endpoint and ":" in endpoint:
        base, port = endpoint.rsplit(":", 1)
        return f"{base}:{int(port) + offset}"
    raise ValueError(f"invalid kv-events endpoint {endpoint!r}")


def binds(endpoint: str) -> bool:
    """vLLM's heuristic: wildcard hosts, ipc and inproc bind; a concrete host connects."""
    return ("*" in endpoint or "::" in endpoint or endpoint.startswith("ipc://")
            or endpoint.startswith("inproc://"))


class ZmqEventPublisher:
    """PUB + optional ROUTER replay for one server; ``publish`` never blocks the loop."""

    def __init__(self, config: KVEventsConfig, data_parallel_rank: int = 0) -> None:
        import msgpack
        import zmq
        import zmq.asyncio

        self.config = config
        self._zmq = zmq
        self._pack = msgpack.Packer(use_bin_type=True).pack
        self._dp_rank = data_parallel_rank
        self._topic = config.topic.encode()
        self._seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=max(1, config.buffer_steps))
        self._ctx = zmq.asyncio.Context.instance()
        # PUB is used synchronously (a non-blocking send from the event loop), ROUTER
        # through asyncio; both on the one process-wide context.
        self._pub = zmq.Context.shadow(self._ctx.underlying).socket(zmq.PUB)
        self._pub.set_hwm(config.hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        if binds(config.endpoint):
            self._pub.bind(config.endpoint)
        else:
            self._pub.connect(config.endpoint)
        self._replay = None
        self._task: asyncio.Task[None] | None = None
        if config.replay_endpoint:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(config.replay_endpoint)
            self._task = asyncio.get_running_loop().create_task(self._serve_replay(),
                                                                name="vllmsim-kv-replay")
        self.messages = 0
        self.events = 0

    @property
    def next_seq(self) -> int:
        return self._seq

    def describe(self) -> dict[str, Any]:
        c = self.config
        return {"topic": c.topic, "endpoint": c.endpoint, "binds": binds(c.endpoint),
                "replay_endpoint": c.replay_endpoint, "next_seq": self._seq,
                "messages": self.messages, "events": self.events}

    def publish(self, events: list[dict[str, Any]], ts: float | None = None) -> None:
        """Send one batch (one engine step's events)."""
        payload = self._pack([time.time() if ts is None else ts, events, self._dp_rank])
        seq = self._seq
        self._seq += 1
        self._buffer.append((seq, payload))
        try:
            self._pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload),
                                     flags=self._zmq.NOBLOCK, copy=False)
        except self._zmq.Again:
            pass  # over the high-water mark: dropped, as a PUB socket does
        self.messages += 1
        self.events += len(events)

    async def _serve_replay(self) -> None:
        assert self._replay is not None
        while True:
            frames = await self._replay.recv_multipart()
            if len(frames) != 3:
                log.warning("invalid replay request: %d frames", len(frames))
                continue
            client, _, start = frames
            first = int.from_bytes(start, "big")
            for seq, payload in list(self._buffer):
                if seq >= first:
                    await self._replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
            await self._replay.send_multipart((client, b"", END_SEQ, b""))

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)
