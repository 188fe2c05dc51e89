"""Prefill/decode disaggregation as vLLM's NixlConnector toy proxy drives it."""
from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Any

import aiohttp
import pytest

from vllmsim import KVTransferConfig, SimCluster, render_chat, tokenize
from vllmsim.testing import run_cluster_subprocess

PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                  "remote_block_ids": None, "remote_host": None, "remote_port": None}
KV_BOTH = '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'


def n_tokens(content: str) -> int:
    return len(tokenize(render_chat([{"role": "user", "content": content}])))


def post(url: str, body: dict[str, Any], timeout: float = 30) -> tuple[dict[str, str], Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read().decode()
        return dict(r.headers), raw if body.get("stream") else json.loads(raw)


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def proxy(prefill: str, decode: str, body: dict[str, Any]) -> tuple[dict, dict[str, str], Any]:
    """vLLM's toy_proxy_server: prefill with max_tokens 1, then decode with its params."""
    pre = dict(body, max_tokens=1, stream=False, kv_transfer_params=PREFILL_PARAMS)
    pre.pop("stream_options", None)
    _, answer = post(f"{prefill}/v1/chat/completions", pre)
    kvp = answer["kv_transfer_params"]
    headers, out = post(f"{decode}/v1/chat/completions", dict(body, kv_transfer_params=kvp))
    return kvp, headers, out


def chat_body(content: str, max_tokens: int = 20, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": content}],
                            "max_tokens": max_tokens, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def by_source(metrics_text: str) -> dict[str, float]:
    out = {}
    for line in metrics_text.splitlines():
        if line.startswith("vllm:prompt_tokens_by_source_total{"):
            src = line.split('source="')[1].split('"')[0]
            out[src] = float(line.rsplit(" ", 1)[1])
    return out


def test_pd_across_processes_stream_and_not_without_recompute() -> None:
    args = ["--time-scale", "0.05", "--seed", "3", "--kv-transfer-config", KV_BOTH]
    with run_cluster_subprocess(1, args=args) as p, run_cluster_subprocess(1, args=args) as d:
        content = "a long shared document about prefill and decode " * 60
        n = n_tokens(content)
        kvp, h, out = proxy(p.urls[0], d.urls[0], chat_body(content, 20))
        p_state = get(f"{p.urls[0]}/sim/state")
        assert kvp["do_remote_prefill"] is True and kvp["do_remote_decode"] is False
        assert kvp["remote_host"] == "127.0.0.1" and kvp["remote_port"] == p_state["side_channel_port"]
        assert kvp["remote_engine_id"] == p_state["engine_id"] and len(kvp["remote_block_ids"]) == -(-(n + 1) // 16)
        assert out["usage"] == {"prompt_tokens": n, "total_tokens": n + 20, "completion_tokens": 20,
                                "prompt_tokens_details": None}
        assert out["kv_transfer_params"] is None
        d_state = get(f"{d.urls[0]}/sim/state")
        # The decode server pulled the prompt and computed only its last token.
        assert d_state["prompt_tokens_by_source"] == {"local_compute": 1, "local_cache_hit": 0,
                                                      "external_kv_transfer": n}
        assert p_state["kv_transfers"]["pulled"] == 1 and p_state["held_blocks"] == 0
        assert float(h["x-sim-ttft"]) < 0.03  # a 1-token step plus ~5 us/token of transfer
        # Streaming decode, a second prompt.
        content2 = "another document, streamed this time " * 50
        kvp2, _, raw = proxy(p.urls[0], d.urls[0], chat_body(content2, 8, stream=True))
        assert raw.rstrip().endswith("data: [DONE]") and '"completion_tokens":8' in raw
        with urllib.request.urlopen(f"{d.urls[0]}/metrics", timeout=10) as r:
            src = by_source(r.read().decode())
        n2 = n_tokens(content2)
        assert src == {"local_compute": 2.0, "local_cache_hit": 0.0, "external_kv_transfer": float(n + n2)}
        assert get(f"{p.urls[0]}/sim/state")["kv_transfers"]["pulled"] == 2


def test_blocks_are_held_until_timeout_then_the_decode_server_recomputes() -> None:
    # 2 simulated seconds of abort timeout at time-scale 0.05 = 0.1 s of wall time.
    pargs = ["--time-scale", "0.05", "--kv-transfer-config", KV_BOTH, "--kv-abort-timeout", "2",
             "--set", "num_gpu_blocks=400"]
    with run_cluster_subprocess(1, args=pargs) as p, \
            run_cluster_subprocess(1, args=["--time-scale", "0.05", "--kv-transfer-config", KV_BOTH]) as d:
        content = "held blocks wait for a decode server " * 40
        n = n_tokens(content)
        _, answer = post(f"{p.urls[0]}/v1/chat/completions",
                         dict(chat_body(content, 1), kv_transfer_params=PREFILL_PARAMS))
        kvp = answer["kv_transfer_params"]
        st = get(f"{p.urls[0]}/sim/state")
        assert st["held_blocks"] == len(kvp["remote_block_ids"]) > 0
        assert st["free_blocks"] == 400 - st["held_blocks"]  # not evictable
        time.sleep(0.4)
        st = get(f"{p.urls[0]}/sim/state")
        assert st["held_blocks"] == 0 and st["kv_transfers"]["expired"] == 1 and st["free_blocks"] == 400
        _, out = post(f"{d.urls[0]}/v1/chat/completions", dict(chat_body(content, 4), kv_transfer_params=kvp))
        assert out["usage"]["completion_tokens"] == 4
        ds = get(f"{d.urls[0]}/sim/state")
        assert ds["kv_transfers"]["recomputed"] == 1
        assert ds["prompt_tokens_by_source"] == {"local_compute": n, "local_cache_hit": 0,
                                                 "external_kv_transfer": 0}


@pytest.mark.asyncio
async def test_restarted_prefill_server_forgets_its_blocks_and_in_process_pd(sim) -> None:
    kv = KVTransferConfig(kv_role="kv_both")
    configs = [sim.make_config(kv_transfer=kv), sim.make_config(kv_transfer=kv)]
    async with SimCluster(configs=configs) as c, aiohttp.ClientSession() as s:
        p_url, d_url = c.urls
        content = "restart loses the prefill server's memory " * 40
        body = dict(chat_body(content, 3), kv_transfer_params=PREFILL_PARAMS)
        async with s.post(f"{p_url}/v1/chat/completions", json=body) as r:
            kvp = (await r.json())["kv_transfer_params"]
        await c.servers[0].crash()
        await c.servers[0].restart()
        async with s.post(f"{d_url}/v1/chat/completions",
                          json=dict(chat_body(content, 3), kv_transfer_params=kvp)) as r:
            assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 3
        assert c.servers[1].state()["kv_transfers"]["recomputed"] == 1
        # A fresh pair of requests works in-process too, and the decode TTFT is tiny.
        async with s.post(f"{p_url}/v1/chat/completions", json=body) as r:
            p_ttft = float(r.headers["x-sim-ttft"])
            kvp = (await r.json())["kv_transfer_params"]
        async with s.post(f"{d_url}/v1/chat/completions",
                          json=dict(chat_body(content, 3), kv_transfer_params=kvp)) as r:
            d_ttft = float(r.headers["x-sim-ttft"])
        assert d_ttft < 0.01 < 0.03 < p_ttft  # one decode step vs ~470 tokens of prefill
        # The recompute cached the prompt on the decode server: only the rest is transferred.
        n = n_tokens(content)
        src = c.servers[1].state()["prompt_tokens_by_source"]
        assert src["external_kv_transfer"] == n - (n - 1) // 16 * 16
        assert src["local_cache_hit"] == (n - 1) // 16 * 16


@pytest.mark.asyncio
async def test_mixed_server_charges_prefill_inside_decode_batches(sim) -> None:
    """Why PD pays off: a long prompt arriving on a mixed server stretches its ITL."""
    async with SimCluster(configs=[sim.make_config(time_scale=0.5)]) as c, aiohttp.ClientSession() as s:
        url = c.urls[0]

        async def stream_itl() -> float:
            body = chat_body("short question", 40, stream=True)
            async with s.post(f"{url}/v1/chat/completions", json=body) as r:
                await r.read()
            async with s.get(f"{url}/metrics") as r:
                text = await r.text()
            line = next(x for x in text.splitlines() if x.startswith("vllm:inter_token_latency_seconds_sum"))
            return float(line.rsplit(" ", 1)[1])

        quiet = await stream_itl()
        task = asyncio.ensure_future(stream_itl())
        await asyncio.sleep(0.03)  # ~9 of its 40 tokens (~6.6 ms each at time-scale 0.5)
        async with s.post(f"{url}/v1/chat/completions", json=chat_body("long prompt " * 2500, 1)) as r:
            assert r.status == 200
        busy = await task - quiet
        assert busy > quiet + 0.2  # ~8k prompt tokens at 0.06 ms each land in decode steps


def test_kv_transfer_config_keys() -> None:
    cfg = KVTransferConfig.from_json(KV_BOTH)
    assert cfg.kv_role == "kv_both" and cfg.kv_connector == "NixlConnector"
    with pytest.raises(ValueError):
        KVTransferConfig.from_json('{"kv_role": "kv_sideways"}')
    with pytest.raises(ValueError):
        KVTransferConfig.from_json('{"kv_role": "kv_both", "nope": 1}')
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen("http://127.0.0.1:1/", timeout=1)
