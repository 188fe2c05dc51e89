"""/metrics: real vLLM 0.32 names/labels/buckets, and the LoRA/legacy/SGLang switches."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vllmsim import SimCluster

REQUIRED = {
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:cache_config_info",
    "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:num_preemptions",
    "vllm:request_success", "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
}


def label_sets(text: str) -> dict[str, set[tuple[str, frozenset[str]]]]:
    """family name -> {(sample name, label keys)}"""
    out: dict[str, set[tuple[str, frozenset[str]]]] = {}
    for fam in text_string_to_metric_families(text):
        out.setdefault(fam.name, set()).update(
            (s.name, frozenset(s.labels)) for s in fam.samples)
    return out


def buckets(text: str, family: str) -> list[str]:
    fam = next(f for f in text_string_to_metric_families(text) if f.name == family)
    return [s.labels["le"] for s in fam.samples if s.name.endswith("_bucket")]


async def get_metrics(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(f"{url}/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return await r.text()


@pytest.mark.asyncio
async def test_metric_names_labels_and_buckets_match_fixture(sim) -> None:
    fixture = (sim.FIXTURES / "vllm-0.32-metrics.txt").read_text()
    ref = label_sets(fixture)
    async with SimCluster(1, config=sim.make_config()) as c, aiohttp.ClientSession() as s:
        await sim.chat(s, c.urls[0], "warm up", max_tokens=3)
        text = await get_metrics(s, c.urls[0])
    ours = label_sets(text)
    assert REQUIRED <= set(ours)
    vllm_families = {name for name in ours if name.startswith("vllm:")}
    for name in vllm_families:
        assert name in ref, f"{name} is not a vLLM 0.32 metric"
        assert ours[name] == ref[name], name
    for fam in ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds"):
        assert buckets(text, fam) == buckets(fixture, fam)
    info = next(f for f in text_string_to_metric_families(text) if f.name == "vllm:cache_config_info")
    labels = info.samples[0].labels
    assert labels["block_size"] == "16" and labels["num_gpu_blocks"] == "28672"
    assert labels["enable_prefix_caching"] == "True" and info.samples[0].value == 1.0
    assert labels["engine"] == "0"
    assert 'model_name="sim-model"' in text
    assert "vllm:gpu_cache_usage_perc" not in text and "lora_requests_info" not in text


@pytest.mark.asyncio
async def test_counters_and_histograms_move(sim) -> None:
    # Time scale 0.5, not 0.02: the latency bound below is in simulated seconds, and a
    # loaded machine's wall-clock stalls are multiplied by 1/time_scale.
    async with SimCluster(1, config=sim.make_config(0.5)) as c, aiohttp.ClientSession() as s:
        await asyncio.gather(*(sim.chat(s, c.urls[0], f"q{i}", max_tokens=5) for i in range(3)))
        m = await sim.metrics(s, c.urls[0])
    assert m["vllm:generation_tokens_total"] == 15
    assert m["vllm:time_to_first_token_seconds_count"] == 3
    assert m["vllm:inter_token_latency_seconds_count"] == 12
    assert m["vllm:e2e_request_latency_seconds_count"] == 3
    assert m["vllm:request_queue_time_seconds_count"] == 3
    assert 0.005 < m["vllm:e2e_request_latency_seconds_sum"] / 3 < 0.2  # simulated seconds
    fam = next(f for f in m["_families"] if f.name == "vllm:request_success")
    by_reason = {x.labels["finished_reason"]: x.value for x in fam.samples if x.name.endswith("_total")}
    assert by_reason == {"stop": 0, "length": 3, "abort": 0, "error": 0, "repetition": 0}


@pytest.mark.asyncio
async def test_kv_usage_and_running_gauges_during_load(sim) -> None:
    cfg = sim.make_config(0.2, profile_overrides={"num_gpu_blocks": 400})
    async with SimCluster(1, config=cfg) as c, aiohttp.ClientSession() as s:
        task = asyncio.gather(*(sim.chat(s, c.urls[0], sim.words(500, str(i)), max_tokens=50)
                                for i in range(4)))
        peak_usage = peak_running = 0.0
        while not task.done():
            m = await sim.metrics(s, c.urls[0])
            peak_usage = max(peak_usage, m["vllm:kv_cache_usage_perc"])
            peak_running = max(peak_running, m["vllm:num_requests_running"])
            await asyncio.sleep(0.005)
        await task
        m = await sim.metrics(s, c.urls[0])
    assert peak_running >= 2 and peak_usage > 0.3
    assert m["vllm:kv_cache_usage_perc"] == 0.0 and m["vllm:num_requests_running"] == 0


@pytest.mark.asyncio
async def test_legacy_gpu_cache_metric_switch(sim) -> None:
    async with SimCluster(1, config=sim.make_config(legacy_gpu_cache_metric=True)) as c, \
            aiohttp.ClientSession() as s:
        m = await sim.metrics(s, c.urls[0])
    assert m["vllm:gpu_cache_usage_perc"] == 0.0 and "vllm:kv_cache_usage_perc" in m


@pytest.mark.asyncio
async def test_lora_adapters_metric_models_and_scheduling(sim) -> None:
    cfg = sim.make_config(0.2, lora_adapters=("sql", "chat"))
    async with SimCluster(1, config=cfg) as c, aiohttp.ClientSession() as s:
        url = c.urls[0]
        async with s.get(f"{url}/v1/models") as r:
            models = (await r.json())["data"]
        assert [m["id"] for m in models] == ["sim-model", "sql", "chat"]
        assert models[1]["parent"] == "sim-model"
        task = asyncio.gather(sim.chat(s, url, "a", model="sql", max_tokens=40),
                              sim.chat(s, url, "b", model="chat", max_tokens=40))
        seen: set[tuple[str, str, str]] = set()
        while not task.done():
            text = await get_metrics(s, url)
            for fam in text_string_to_metric_families(text):
                if fam.name == "vllm:lora_requests_info":
                    for x in fam.samples:
                        seen.add((x.labels["running_lora_adapters"], x.labels["waiting_lora_adapters"],
                                  x.labels["max_lora"]))
                        assert x.value > 1e9  # a timestamp, like vLLM
            await asyncio.sleep(0.005)
        res = await task
    assert [r[2]["model"] for r in res] == ["sql", "chat"]
    # max_loras=1: while one adapter runs the other must wait.
    assert ("sql", "chat", "1") in seen or ("chat", "sql", "1") in seen


@pytest.mark.asyncio
async def test_sglang_flavor(sim) -> None:
    async with SimCluster(1, config=sim.make_config(metrics_flavor="sglang")) as c, \
            aiohttp.ClientSession() as s:
        await sim.chat(s, c.urls[0], "hello", max_tokens=3)
        text = await get_metrics(s, c.urls[0])
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("sglang:num_queue_reqs", "sglang:num_running_reqs", "sglang:token_usage"):
        assert name in fams
        assert fams[name].samples[0].labels["model_name"] == "sim-model"
    assert fams["sglang:time_to_first_token_seconds"].type == "histogram"
    assert not any(n.startswith("vllm:") for n in fams)


@pytest.mark.asyncio
async def test_metrics_render_is_cheap(sim) -> None:
    """Scraped every 50-100 ms per server by the gateway: keep it well under a millisecond."""
    import time
    async with SimCluster(1, config=sim.make_config()) as c, aiohttp.ClientSession() as s:
        await sim.chat(s, c.urls[0], "x", max_tokens=3)
        srv = c.servers[0]
        eng, m = srv.engine, srv.metrics
        assert eng is not None and m is not None
        t = time.perf_counter()
        for _ in range(200):
            m.hist["time_to_first_token_seconds"].observe(0.1)  # invalidate one histogram
            m.render(running=1, waiting=2, kv_usage=0.5)
        per = (time.perf_counter() - t) / 200
    assert per < 0.002
