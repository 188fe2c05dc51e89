"""The subscribers on real ZeroMQ sockets against the simulator's publisher (vLLM's wire
format and socket rules): both socket roles, eviction under pressure, history replay for
a late subscriber, and an engine restart. The view is checked against the simulator's
own prefix cache, hash for hash."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from aibench.devstack import free_port_range
from extproc.signals.kv_events import KvEventsHub, KvEventsSpec
from extproc.signals.kv_events.spec import EndpointMap
from vllmsim import KVEventsConfig, SimCluster
from vllmsim.profile import load_profile

pytestmark = pytest.mark.asyncio


def cached(cluster, i: int) -> set[int]:
    return set(cluster.servers[i].engine.kv.cached)


async def chat(s, port: int, content: str) -> None:
    async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": content}], "max_tokens": 2}) as r:
        assert r.status == 200, await r.text()
        await r.read()


async def until(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.02)
    assert pred()


def sim(n: int, ev: KVEventsConfig, blocks: int = 64):
    return SimCluster(n=n, time_scale=0.001, kv_events=ev, admin_port=None,
                      profile=load_profile(overrides={"num_gpu_blocks": blocks, "block_size": 16}))


@pytest.mark.parametrize("role", ["engine_connects_out", "engine_binds"])
async def test_the_view_follows_the_engines_cache_through_evictions(role, tmp_path):
    base = free_port_range(2)   # the engines publish on base and base+1 (vLLM's per-rank offset)
    if role == "engine_connects_out":   # vLLM given a concrete host connects; ai-lb binds
        ev = KVEventsConfig(enable_kv_cache_events=True, endpoint=f"tcp://127.0.0.1:{base}")
    else:                               # ipc binds on the engine's side (as tcp://*:P would), ai-lb connects
        ev = KVEventsConfig(enable_kv_cache_events=True, endpoint=f"ipc://{tmp_path}/kv")
    async with sim(2, ev) as c:
        addrs = [f"127.0.0.1:{p}" for p in c.ports]
        urls = [f"tcp://127.0.0.1:{base + i}" for i in range(2)] if role == "engine_connects_out" \
            else [f"ipc://{tmp_path}/kv", f"ipc://{tmp_path}/kv_1"]
        spec = KvEventsSpec(endpoint="tcp://{host}:1", bind=role == "engine_connects_out",
                            endpoints=EndpointMap(sorted(zip(addrs, urls))))
        hub = KvEventsHub(spec)
        hub.want("t", addrs)
        try:
            async with aiohttp.ClientSession() as s:
                # PUB drops what it sends before the subscriber is connected: warm up until heard.
                for i in range(50):
                    await chat(s, c.ports[0], f"warm up {i} " * 30)
                    await chat(s, c.ports[1], f"warm up {i} " * 30)
                    await asyncio.sleep(0.05)
                    if all(hub.streams[a].heard_at for a in addrs):
                        break
                for p in c.ports:                           # AllBlocksCleared, with the next step's batch
                    async with s.post(f"http://127.0.0.1:{p}/reset_prefix_cache") as r:
                        assert (await r.json())["success"]
                # 40 distinct ~200-token prompts through 64-block caches: constant eviction.
                for i in range(40):
                    await chat(s, c.ports[i % 2], f"distinct prompt number {i} " * 25)
                await until(lambda: all(set(hub.index.get(a).blocks) == cached(c, i) for i, a in enumerate(addrs)))
            assert all(hub.streams[a].live(time.monotonic()) is None for a in addrs)
            st = hub.stats()
            assert st.get("gaps", 0) == 0 and st["cleared"] >= 2 and hub.index.counts.get("unknown_removed", 0) == 0
            assert sum(c.servers[i].engine.kv.evictions for i in range(2)) > 50      # it did evict
        finally:
            hub.close()


async def test_a_late_subscriber_replays_history_and_a_restart_clears_the_view():
    pub = free_port_range(1)
    rep = free_port_range(1, avoid=[pub])
    ev = KVEventsConfig(enable_kv_cache_events=True, endpoint=f"tcp://127.0.0.1:{pub}",
                        replay_endpoint=f"tcp://127.0.0.1:{rep}")
    async with sim(1, ev, blocks=256) as c:
        addr = f"127.0.0.1:{c.ports[0]}"
        async with aiohttp.ClientSession() as s:
            for i in range(5):                              # published before anyone listens: lost
                await chat(s, c.ports[0], f"early prompt {i} " * 20)
            hub = KvEventsHub(KvEventsSpec(endpoint=f"tcp://127.0.0.1:{pub}", bind=True,
                                           replay_endpoint=f"tcp://127.0.0.1:{rep}", rebuild_window=0))
            hub.want("t", [addr])
            try:
                for i in range(50):
                    await chat(s, c.ports[0], f"late prompt {i} " * 20)
                    await asyncio.sleep(0.05)
                    st = hub.streams[addr]
                    if st.heard_at and st.replaying_from is None:
                        break
                await until(lambda: set(hub.index.get(addr).blocks) == cached(c, 0))
                assert hub.stats()["replays"] >= 1 and hub.stats()["replayed"] >= 5   # the early ones came back
                before = len(hub.index.get(addr))
                await c.servers[0].crash(0.05)              # a new engine: counter back to 0, empty cache
                await until(lambda: c.servers[0].engine is not None and c.servers[0].alive, 5)
                for i in range(50):                         # until the new engine's PUB has connected
                    await chat(s, c.ports[0], f"after the restart {i} " * 20)
                    await asyncio.sleep(0.05)
                    if hub.stats().get("restarts", 0) >= 1:
                        break
                assert hub.stats().get("restarts", 0) >= 1, hub.stats()
                await until(lambda: set(hub.index.get(addr).blocks) == cached(c, 0))
                assert len(hub.index.get(addr)) < before
            finally:
                hub.close()
