"""The PD sidecar against simulated vLLM servers (NixlConnector flow): prefill on the named
server then decode with its kv_transfer_params, streaming passed through, every prefill
failure decoded locally and counted, client kv_transfer_params removed, other paths
passed through, the decode server's own failures answered."""

import json

import aiohttp
import pytest
import pytest_asyncio

from extproc.pd_sidecar import PREFILL_HEADER, Sidecar, SidecarConfig
from extproc.pd_sidecar.proxy import parse_allow, prefill_target
from vllmsim import KVTransferConfig, ServerConfig, SimCluster, load_profile


def sim_config(**kw):
    return ServerConfig(model="sim-model", profile=load_profile("h100-8b"), time_scale=0.02, seed=1,
                        kv_transfer=KVTransferConfig(kv_role="kv_both"), **kw)


@pytest_asyncio.fixture
async def pd():
    async with SimCluster(configs=[sim_config(), sim_config()], admin_port=None) as c:
        car = Sidecar(SidecarConfig(listen="127.0.0.1:0", decode=c.urls[1], prefill_timeout=5))
        await car.start()
        try:
            yield c, car, f"http://127.0.0.1:{car.port}"
        finally:
            await car.stop()


def body(tag, stream=False, **kw):
    return {"model": "sim-model", "messages": [{"role": "user", "content": f"[{tag}] " + "a long prompt " * 200}],
            "max_tokens": 6, "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {}), **kw}


def computed(c, i):
    return c.servers[i].state()["prompt_tokens_by_source"]["local_compute"]


def count(car, outcome):
    return car.requests.labels(outcome)._value.get()


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True])
async def test_prefill_there_decode_here_without_recomputing(pd, stream):
    c, car, url = pd
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/chat/completions", json=body("x", stream),
                          headers={PREFILL_HEADER: f"127.0.0.1:{c.ports[0]}"}) as r:
            raw = await r.read()
            assert r.status == 200 and r.headers["x-pd-prefill"] == f"127.0.0.1:{c.ports[0]}"
            assert r.headers["x-sim-server"] == str(c.ports[1])
    if stream:
        assert raw.decode().rstrip().endswith("data: [DONE]") and r.headers["content-type"].startswith("text/event-stream")
    else:
        assert json.loads(raw)["usage"]["completion_tokens"] == 6
    assert computed(c, 1) == 1 and computed(c, 0) > 600  # the decode server computed one token
    assert c.servers[0].state()["kv_transfers"]["pulled"] == 1
    assert count(car, "disaggregated") == 1


@pytest.mark.asyncio
async def test_every_prefill_failure_decodes_locally_and_is_counted(pd):
    c, car, url = pd
    strict = Sidecar(SidecarConfig(listen="127.0.0.1:0", decode=c.urls[1], allow=parse_allow(["10.0.0.0/8"])))
    await strict.start()
    try:
        async with aiohttp.ClientSession() as s:
            for i, (target, sidecar, reason) in enumerate((
                    ("127.0.0.1:1", car, "connect"), ("prefill.local:8000", car, "bad_header"),
                    (f"127.0.0.1:{c.ports[1]}/x", car, "bad_header"), (f"127.0.0.1:{c.ports[0]}", strict, "not_allowed"))):
                before = computed(c, 1)
                async with s.post(f"http://127.0.0.1:{sidecar.port}/v1/chat/completions", json=body(f"{i}{reason}"),
                                  headers={PREFILL_HEADER: target}) as r:
                    assert r.status == 200 and r.headers["x-pd-prefill"] == "failed"
                    await r.read()
                assert computed(c, 1) - before > 600  # decoded locally: the whole prompt computed here
                assert sidecar.failures.labels(reason)._value.get() >= 1
            # a prefill server that answers an error: the same
            async with s.post(c.urls[0] + "/sim/faults", json={"error_rate": 1.0, "error_status": 503}) as r:
                assert r.status == 200
            async with s.post(url + "/v1/chat/completions", json=body("e"),
                              headers={PREFILL_HEADER: f"127.0.0.1:{c.ports[0]}"}) as r:
                assert r.status == 200 and r.headers["x-pd-prefill"] == "failed"
            assert car.failures.labels("status_503")._value.get() == 1
            # the decode server's own answer to a bad request passes through as it is
            async with s.post(url + "/v1/chat/completions", json=body("bad", max_tokens=0)) as r:
                assert r.status == 400 and (await r.json())["error"]["type"] == "BadRequestError"
    finally:
        await strict.stop()
    assert c.servers[0].state()["kv_transfers"]["pulled"] == 0


@pytest.mark.asyncio
async def test_client_kv_params_are_removed_and_other_paths_pass_through(pd):
    c, car, url = pd
    forged = {"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": c.servers[0].side_channel_port,
              "remote_engine_id": "x", "remote_request_id": "y", "remote_block_ids": [1]}
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/chat/completions", json=body("forged", kv_transfer_params=forged)) as r:
            assert r.status == 200 and r.headers["x-pd-prefill"] == "none"
        assert computed(c, 1) > 600 and c.servers[1].state()["kv_transfers"]["pull_failures"] == 0
        assert car.client_params._value.get() == 1 and count(car, "local") == 1
        async with s.get(url + "/health") as r:
            assert r.status == 200 and "x-pd-prefill" not in r.headers
        async with s.get(url + "/metrics") as r:
            assert "vllm:num_requests_running" in await r.text()
        async with s.get(url + "/v1/models?x=1") as r:
            assert (await r.json())["data"][0]["id"] == "sim-model"
        async with s.get(url + "/pd-sidecar/metrics") as r:
            text = await r.text()
            assert 'ai_lb_pd_sidecar_requests_total{outcome="local"} 1.0' in text
        await c.servers[1].crash()
        async with s.post(url + "/v1/chat/completions", json=body("down")) as r:
            assert r.status == 502 and "unreachable" in (await r.json())["error"]["message"]


def test_only_literal_addresses_and_the_allow_list():
    allow = parse_allow(["10.0.0.0/8", "192.168.1.5", "[::1]:8000", "172.16.0.9:8001"])
    assert prefill_target("10.1.2.3:8000", allow) == ("10.1.2.3:8000", "")
    assert prefill_target("192.168.1.5:9", allow) == ("192.168.1.5:9", "")
    assert prefill_target("[::1]:8000", allow) == ("[::1]:8000", "")
    assert prefill_target("[::1]:8001", allow) == (None, "not_allowed")
    assert prefill_target("172.16.0.9:8000", allow) == (None, "not_allowed")
    assert prefill_target("evil.example.com:80", ()) == (None, "bad_header")
    assert prefill_target("1.2.3.4", ()) == (None, "bad_header")
    assert prefill_target("1.2.3.4:99999", ()) == (None, "bad_header")
