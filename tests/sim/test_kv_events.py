"""KV-cache events over ZMQ, against the vLLM 0.32 capture and the simulator's own cache."""
from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest
import zmq
import zmq.asyncio

from vllmsim import KVEventsConfig, SimCluster, render_chat, tokenize
from vllmsim.kvcache import block_hashes

FIXTURE = Path("/work/shared/fixtures/vllm-0.32-kv-events.txt")


def fixture_events() -> list[dict[str, Any]]:
    lines = FIXTURE.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.startswith("decoded payload"):
            out += json.loads(lines[i + 1])[1]
    return out


class Subscriber:
    """A SUB socket that binds (vLLM connects out to a concrete host) or connects."""

    def __init__(self, endpoint: str | None = None) -> None:
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.LINGER, 0)
        if endpoint is None:
            self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
            self.endpoint = f"tcp://127.0.0.1:{self.port}"
        else:
            self.sock.connect(endpoint)
            self.endpoint = endpoint

    async def recv(self, timeout: float = 5.0) -> tuple[bytes, int, list[Any]]:
        topic, seq, payload = await asyncio.wait_for(self.sock.recv_multipart(), timeout)
        assert len(seq) == 8
        return topic, int.from_bytes(seq, "big"), msgpack.unpackb(payload, raw=False)

    async def drain(self, quiet: float = 0.3) -> list[tuple[bytes, int, list[Any]]]:
        out = []
        while True:
            try:
                out.append(await self.recv(quiet))
            except asyncio.TimeoutError:
                return out

    def close(self) -> None:
        self.sock.close(linger=0)


async def chat(s: aiohttp.ClientSession, url: str, content: str, model: str | None = None) -> dict:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": content}], "max_tokens": 2}
    if model:
        body["model"] = model
    async with s.post(f"{url}/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def prompt_ids(content: str) -> list[int]:
    return tokenize(render_chat([{"role": "user", "content": content}]))


async def until_connected(s: aiohttp.ClientSession, url: str, sub: Subscriber) -> None:
    """PUB drops what it sends before the subscriber is connected: send until one arrives."""
    for i in range(50):
        await chat(s, url, f"warm up {i} " * 20)
        try:
            await sub.recv(0.2)
            break
        except asyncio.TimeoutError:
            continue
    await sub.drain()
    async with s.post(f"{url}/reset_prefix_cache") as r:
        assert await r.json() == {"success": True}


def apply(cache: set[int], events: list[dict[str, Any]]) -> None:
    for ev in events:
        if ev["type"] == "BlockStored":
            cache.update(ev["block_hashes"])
        elif ev["type"] == "BlockRemoved":
            cache.difference_update(ev["block_hashes"])
        elif ev["type"] == "AllBlocksCleared":
            cache.clear()


@pytest.mark.asyncio
async def test_events_match_fixture_format_and_the_simulators_cache(sim) -> None:
    sub = Subscriber()
    cfg = sim.make_config(kv_events=KVEventsConfig(
        enable_kv_cache_events=True, publisher="zmq", endpoint=sub.endpoint, topic="kv@{port}@{model}"),
        profile_overrides={"num_gpu_blocks": 96, "block_size": 16})
    try:
        async with SimCluster(configs=[cfg]) as c, aiohttp.ClientSession() as s:
            url, srv = c.urls[0], c.servers[0]
            await until_connected(s, url, sub)
            system = "shared system prompt about caching " * 20
            await chat(s, url, system + "question one")
            topic, seq0, (ts, events, rank) = await sub.recv()
            assert topic == f"kv@{c.ports[0]}@sim-model".encode() and rank == 0 and isinstance(ts, float)
            # The reset queued AllBlocksCleared; it goes out with the next step's batch.
            assert events[0] == {"type": "AllBlocksCleared"}
            stored = events[1]
            ref = next(e for e in fixture_events() if e["type"] == "BlockStored")
            assert list(stored) == list(ref)  # same keys, same order
            assert {k: type(v) for k, v in stored.items() if v is not None} == \
                   {k: type(v) for k, v in ref.items() if v is not None}
            ids = prompt_ids(system + "question one")
            n = len(ids) // 16
            assert stored["block_hashes"] == block_hashes(ids, 16)[:n] and stored["parent_block_hash"] is None
            assert stored["token_ids"] == ids[: n * 16] and stored["block_size"] == 16
            assert stored["extra_keys"] == [None] * n and stored["medium"] == "GPU"
            # A follow-up sharing the prefix stores only its new blocks, chained to the old.
            await chat(s, url, system + "question two, which is a little longer than one")
            _, seq1, (_, ev2, _) = await sub.recv()
            assert seq1 == seq0 + 1 and ev2[0]["type"] == "BlockStored"
            assert ev2[0]["parent_block_hash"] in stored["block_hashes"]
            # Pressure: distinct prompts evict; the event stream tracks the cache exactly.
            mirror: set[int] = set(stored["block_hashes"]) | set(ev2[0]["block_hashes"])
            for i in range(8):
                await chat(s, url, f"distinct prompt number {i} " * 40)
            msgs = await sub.drain()
            assert [m[1] for m in msgs] == list(range(seq1 + 1, seq1 + 1 + len(msgs)))
            removed = [e for m in msgs for e in m[2][1] if e["type"] == "BlockRemoved"]
            assert removed and all(len(e["block_hashes"]) == 1 for e in removed)
            assert list(removed[0]) == ["type", "block_hashes", "medium", "group_idx"]
            for m in msgs:
                apply(mirror, m[2][1])
            assert mirror == set(srv.engine.kv.cached)
            assert srv.state()["kv_events"]["next_seq"] == msgs[-1][1] + 1
    finally:
        sub.close()


@pytest.mark.asyncio
async def test_reset_is_published_with_the_next_step_and_lora_fields(sim) -> None:
    path = Path(tempfile.mkdtemp()) / "kv.sock"
    cfg = sim.make_config(lora_adapters=("sql", "chat"), kv_events=KVEventsConfig(
        enable_kv_cache_events=True, endpoint=f"ipc://{path}"))  # ipc: the simulator binds
    async with SimCluster(configs=[cfg]) as c, aiohttp.ClientSession() as s:
        sub = Subscriber(f"ipc://{path}")
        try:
            assert c.servers[0].state()["kv_events"]["binds"] is True
            url = c.urls[0]
            await until_connected(s, url, sub)
            await chat(s, url, "lora prompt text " * 20, model="chat")
            _, _, (_, events, _) = await sub.recv()
            ev = events[-1]
            ids = prompt_ids("lora prompt text " * 20)
            n = len(ids) // 16
            assert (ev["lora_id"], ev["lora_name"]) == (2, "chat")
            assert ev["extra_keys"] == [["chat"]] * n
            assert ev["block_hashes"] == block_hashes(ids, 16, "chat")[:n] != block_hashes(ids, 16)[:n]
            async with s.post(f"{url}/reset_prefix_cache") as r:
                assert await r.json() == {"success": True}
            assert await sub.drain(0.3) == []  # queued until the engine steps
            await chat(s, url, "x")
            _, _, (_, events, _) = await sub.recv()
            assert events == [{"type": "AllBlocksCleared"}]
            assert not c.servers[0].engine.kv.cached
        finally:
            sub.close()


@pytest.mark.asyncio
async def test_replay_returns_past_batches_and_the_end_marker(sim) -> None:
    ctx = zmq.asyncio.Context.instance()
    import socket

    with socket.socket() as probe:  # a plain socket releases its port at once (a ZMQ one closes later)
        probe.bind(("127.0.0.1", 0))
        replay_port = probe.getsockname()[1]
    sub = Subscriber()
    cfg = sim.make_config(kv_events=KVEventsConfig(
        enable_kv_cache_events=True, endpoint=sub.endpoint,
        replay_endpoint=f"tcp://127.0.0.1:{replay_port}", buffer_steps=3))
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        async with SimCluster(configs=[cfg]) as c, aiohttp.ClientSession() as s:
            await until_connected(s, c.urls[0], sub)
            for i in range(4):
                await chat(s, c.urls[0], f"replayed prompt {i} " * 20)
            live = await sub.drain()
            last = live[-1][1]
            dealer.connect(f"tcp://127.0.0.1:{replay_port}")

            async def replay(start: int) -> list[tuple[int, bytes]]:
                await dealer.send_multipart([b"", start.to_bytes(8, "big")])
                got = []
                while True:
                    empty, seq, payload = await asyncio.wait_for(dealer.recv_multipart(), 5)
                    assert empty == b""
                    if seq == (-1).to_bytes(8, "big", signed=True):
                        assert payload == b""
                        return got
                    got.append((int.from_bytes(seq, "big"), payload))

            got = await replay(0)
            assert [g[0] for g in got] == [last - 2, last - 1, last]  # buffer_steps=3
            assert msgpack.unpackb(got[-1][1])[1] == live[-1][2][1]
            assert [g[0] for g in await replay(last)] == [last]
    finally:
        dealer.close(linger=0)
        sub.close()


def test_config_keys_defaults_and_per_server_endpoints() -> None:
    d = KVEventsConfig()
    assert (d.enable_kv_cache_events, d.publisher, d.endpoint, d.replay_endpoint, d.buffer_steps,
            d.hwm, d.max_queue_size, d.topic) == (False, "null", "tcp://*:5557", None, 10000,
                                                  100000, 100000, "")
    c = KVEventsConfig.from_json('{"enable_kv_cache_events": true, "endpoint": "tcp://127.0.0.1:5557",'
                                 ' "replay_endpoint": "tcp://127.0.0.1:6000", "topic": "kv@{host}:{port}"}')
    assert c.publisher == "zmq" and c.enabled
    s2 = c.for_server(2, "127.0.0.1", 8002, "m")
    assert (s2.endpoint, s2.replay_endpoint, s2.topic) == ("tcp://127.0.0.1:5559", "tcp://127.0.0.1:6002",
                                                          "kv@127.0.0.1:8002")
    with pytest.raises(ValueError):
        KVEventsConfig.from_json('{"enable_kv_cache_events": true, "bogus": 1}')
