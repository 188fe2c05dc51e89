"""Engine behaviour over HTTP: prefix caching, eviction, queueing, prefill cost, preemption,
roles.  Latencies are the simulated ones the server reports (x-sim-* headers)."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest

from vllmsim import SimCluster, render_chat, tokenize


def prompt_len(content: str) -> int:
    return len(tokenize(render_chat([{"role": "user", "content": content}])))


def ttft(headers: dict[str, str]) -> float:
    return float(headers["x-sim-ttft"])


@pytest.mark.asyncio
async def test_repeated_prompt_hits_every_full_block(sim) -> None:
    content = sim.words(1000, "rep")
    n = prompt_len(content)
    assert n % 16 != 0
    async with SimCluster(1, config=sim.make_config()) as c, aiohttp.ClientSession() as s:
        url = c.urls[0]
        m0 = await sim.metrics(s, url)
        _, h1, _ = await sim.chat(s, url, content, max_tokens=2)
        m1 = await sim.metrics(s, url)
        _, h2, _ = await sim.chat(s, url, content, max_tokens=2)
        m2 = await sim.metrics(s, url)
    hits = "vllm:prefix_cache_hits_total"
    queries = "vllm:prefix_cache_queries_total"
    assert m1[hits] - m0[hits] == 0 and h1["x-sim-cached-tokens"] == "0"
    assert m2[hits] - m1[hits] == (n // 16) * 16
    assert int(h2["x-sim-cached-tokens"]) == (n // 16) * 16
    assert m2[queries] - m1[queries] == n
    assert m2["vllm:prompt_tokens_total"] == 2 * n
    assert ttft(h2) < ttft(h1) / 3  # cached prefill is much cheaper


@pytest.mark.asyncio
async def test_exact_block_multiple_recomputes_last_block(sim) -> None:
    """Like vLLM, at least one prompt token is always computed."""
    async with SimCluster(1, config=sim.make_config()) as c, aiohttp.ClientSession() as s:
        body = {"prompt": list(range(64)), "max_tokens": 1}
        for _ in range(2):
            async with s.post(f"{c.urls[0]}/v1/completions", json=body) as r:
                cached = int(r.headers["x-sim-cached-tokens"])
    assert cached == 48


@pytest.mark.asyncio
async def test_small_cache_evicts_and_loses_hits(sim) -> None:
    a, b = sim.words(600, "AAA"), sim.words(600, "BBB")
    full = (prompt_len(a) // 16) * 16
    results = {}
    for blocks in (64, 4096):
        cfg = sim.make_config(profile_overrides={"num_gpu_blocks": blocks})
        async with SimCluster(1, config=cfg) as c, aiohttp.ClientSession() as s:
            for content in (a, b):
                await sim.chat(s, c.urls[0], content, max_tokens=4)
            _, h, _ = await sim.chat(s, c.urls[0], a, max_tokens=4)
            st = await sim.state(s, c.urls[0])
        results[blocks] = (int(h["x-sim-cached-tokens"]), st["evicted_blocks"], st["cached_blocks"])
    assert results[4096][0] == full and results[4096][1] == 0
    small_hits, evicted, cached = results[64]
    assert small_hits < full and evicted > 0 and cached <= 64


@pytest.mark.asyncio
async def test_saturation_queues_requests_and_raises_ttft(sim) -> None:
    cfg = sim.make_config(profile_overrides={"max_num_seqs": 4})
    async with SimCluster(1, config=cfg) as c, aiohttp.ClientSession() as s:
        url = c.urls[0]
        _, h_idle, _ = await sim.chat(s, url, "idle probe", max_tokens=32)
        seen_waiting: list[float] = []
        done = asyncio.Event()

        async def watch() -> None:
            while not done.is_set():
                m = await sim.metrics(s, url)
                seen_waiting.append(m["vllm:num_requests_waiting"])
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        res = await asyncio.gather(*(sim.chat(s, url, f"req {i}", max_tokens=32) for i in range(24)))
        done.set()
        await watcher
    assert all(st == 200 for st, _, _ in res)
    assert max(seen_waiting) > 0
    ttfts = sorted(ttft(h) for _, h, _ in res)
    queue = sorted(float(h["x-sim-queue-time"]) for _, h, _ in res)
    assert ttfts[-1] > 4 * ttft(h_idle)  # the last admitted waited for whole requests
    assert sum(ttfts) / len(ttfts) > 2 * ttft(h_idle)
    assert queue[-1] > 0.1  # 5 waves of ~32 decode steps


@pytest.mark.asyncio
async def test_prefill_time_grows_with_uncached_tokens(sim) -> None:
    cfg = sim.make_config(profile_overrides={"max_num_batched_tokens": 512})
    long = sim.words(3000, "long")
    async with SimCluster(1, config=cfg) as c, aiohttp.ClientSession() as s:
        url = c.urls[0]
        _, h_short, _ = await sim.chat(s, url, "short one", max_tokens=1)
        _, h_long, _ = await sim.chat(s, url, long, max_tokens=1)
        _, h_cached, _ = await sim.chat(s, url, long, max_tokens=1)
        _, h_mid, _ = await sim.chat(s, url, sim.words(1000, "mid"), max_tokens=1)
    t_short, t_long, t_cached, t_mid = map(ttft, (h_short, h_long, h_cached, h_mid))
    assert t_long > 5 * t_short and t_long > 5 * t_cached
    assert t_short < t_mid < t_long
    # 3000 tokens at 0.06 ms/token in ceil(3000/512)=6 chunked steps of >= 6.5 ms.
    assert 0.18 < t_long < 0.30


@pytest.mark.asyncio
async def test_simulated_time_independent_of_time_scale(sim) -> None:
    out = []
    for scale in (0.02, 0.2):
        async with SimCluster(1, config=sim.make_config(scale)) as c, aiohttp.ClientSession() as s:
            _, h, _ = await sim.chat(s, c.urls[0], "timing", max_tokens=10)
            out.append(float(h["x-sim-e2e"]))
    for e2e in out:  # 10 steps of ~6.55 ms
        assert 0.060 < e2e < 0.085, out


@pytest.mark.asyncio
async def test_preemption_when_decode_runs_out_of_blocks(sim) -> None:
    cfg = sim.make_config(profile_overrides={"num_gpu_blocks": 24})
    async with SimCluster(1, config=cfg) as c, aiohttp.ClientSession() as s:
        url = c.urls[0]
        res = await asyncio.gather(*(sim.chat(s, url, f"{i} " + sim.words(40, str(i)), max_tokens=100)
                                     for i in range(4)))
        m = await sim.metrics(s, url)
        st = await sim.state(s, url)
    assert all(r[0] == 200 and r[2]["usage"]["completion_tokens"] == 100 for r in res)
    assert m["vllm:num_preemptions_total"] > 0
    assert sum(int(h["x-sim-preemptions"]) for _, h, _ in res) == m["vllm:num_preemptions_total"]
    assert st["kv_cache_usage"] == 0.0 and st["running"] == 0


@pytest.mark.asyncio
async def test_output_len_distribution_stops_early(sim) -> None:
    cfg = sim.make_config(profile_overrides={"output_len": {"distribution": "uniform", "min": 1, "max": 5}})
    async with SimCluster(1, config=cfg) as c, aiohttp.ClientSession() as s:
        res = [await sim.chat(s, c.urls[0], "x", max_tokens=50) for _ in range(6)]
        m = await sim.metrics(s, c.urls[0])
    for _, _, body in res:
        assert body["usage"]["completion_tokens"] <= 5
        assert body["choices"][0]["finish_reason"] == "stop"
    fam = next(f for f in m["_families"] if f.name == "vllm:request_success")
    stop = next(x.value for x in fam.samples if x.labels.get("finished_reason") == "stop")
    assert stop == 6
