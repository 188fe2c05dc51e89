"""Switches that make the simulator look like a plain vLLM (or SGLang) to a tool under test."""
from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import aiohttp
import pytest

from vllmsim import SimCluster
from vllmsim.testing import run_cluster_subprocess


def test_no_sim_api_hides_every_simulator_route_and_header() -> None:
    with run_cluster_subprocess(1, args=["--time-scale", "0.05", "--no-sim-api"]) as h:
        assert h.admin_port is None
        url = h.urls[0]
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
        req = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
            assert not [k for k in r.headers if k.lower().startswith("x-sim")]
        for path, method in (("/sim/state", "GET"), ("/sim/faults", "GET"), ("/sim/crash", "POST"),
                             ("/sim/match", "POST")):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(urllib.request.Request(f"{url}{path}", method=method,
                                                              data=b"{}" if method == "POST" else None),
                                       timeout=5)
            assert e.value.code in (404, 405) and "x-sim-server" not in e.value.headers
        with urllib.request.urlopen(urllib.request.Request(f"{url}/reset_prefix_cache", method="POST"),
                                    timeout=5) as r:
            assert json.loads(r.read()) == {"success": True}
        for path in ("/health", "/v1/models", "/metrics", "/version"):
            with urllib.request.urlopen(f"{url}{path}", timeout=5) as r:
                assert r.status == 200 and "x-sim-server" not in r.headers


@pytest.mark.asyncio
async def test_sglang_flush_cache_and_vllm_reset(sim) -> None:
    configs = [sim.make_config(metrics_flavor="sglang"), sim.make_config()]
    async with SimCluster(configs=configs) as c, aiohttp.ClientSession() as s:
        sg, vl = c.urls
        for url in (sg, vl):
            st, _, _ = await sim.chat(s, url, sim.words(200, "cache"), max_tokens=2)
            assert st == 200 and c.server(c.ports[c.urls.index(url)]).state()["cached_blocks"] > 0
        async with s.post(f"{sg}/flush_cache") as r:
            assert r.status == 200 and (await r.text()).startswith("Cache flushed.")
        async with s.post(f"{vl}/flush_cache") as r:
            assert r.status == 404  # vLLM has no such route
        async with s.post(f"{vl}/reset_prefix_cache") as r:
            assert await r.json() == {"success": True}
        assert [srv.state()["cached_blocks"] for srv in c.servers] == [0, 0]
        # While a request holds blocks the reset is refused and nothing is lost, as in vLLM.
        srv = c.servers[1]
        srv.faults.update({"slowdown": 200.0})
        task = asyncio.ensure_future(sim.chat(s, vl, sim.words(200, "busy"), max_tokens=50))
        while not srv.engine.running:
            await asyncio.sleep(0.005)
        async with s.post(f"{vl}/reset_prefix_cache") as r:
            assert await r.json() == {"success": False}
        srv.faults.update({"slowdown": 1.0})
        assert (await task)[0] == 200


@pytest.mark.asyncio
@pytest.mark.parametrize("raw", [
    b'{"messages": ' + b"[" * 20000 + b"]" * 20000 + b"}",
    b'{"messages": [{"role": "user", "content": "bad \\ud800 surrogate"}]}',
    b'{"messages": [{"role": "user", "content": "x"}], "user": "\\udfff"}',
    b'{"messages": [{"role": "user", "content": "x"}]',
])
async def test_bad_json_is_a_400_with_vllms_error_object(sim, raw) -> None:
    async with SimCluster(configs=[sim.make_config()]) as c, aiohttp.ClientSession() as s:
        for path in ("/v1/chat/completions", "/v1/completions"):
            async with s.post(f"{c.urls[0]}{path}", data=raw,
                              headers={"Content-Type": "application/json"}) as r:
                assert r.status == 400
                body = await r.json()
        assert set(body) == {"error"} and body["error"]["code"] == 400
        assert body["error"]["type"] == "BadRequestError" and body["error"]["message"]
        # A valid surrogate pair (what json.dumps writes for an emoji) is fine.
        ok = b'{"messages": [{"role": "user", "content": "emoji \\ud83d\\ude00"}], "max_tokens": 1}'
        async with s.post(f"{c.urls[0]}/v1/chat/completions", data=ok) as r:
            assert r.status == 200
