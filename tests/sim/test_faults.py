"""Fault injection: slowdown, error rate, hang, crash/restart (Python API and admin port)."""
from __future__ import annotations

import asyncio

import aiohttp
import pytest

from vllmsim import Faults, SimCluster


@pytest.mark.asyncio
async def test_slowdown_increases_latency(sim) -> None:
    async with SimCluster(1, config=sim.make_config()) as c, aiohttp.ClientSession() as s:
        url = c.urls[0]
        _, h1, _ = await sim.chat(s, url, "x", max_tokens=10)
        async with s.post(f"{url}/sim/faults", json={"slowdown": 4.0}) as r:
            assert r.status == 200 and (await r.json())["slowdown"] == 4.0
        _, h2, _ = await sim.chat(s, url, "x", max_tokens=10)
        async with s.post(f"{url}/sim/faults", json={"slowdown": -1}) as r:
            assert r.status == 400
    e1, e2 = float(h1["x-sim-e2e"]), float(h2["x-sim-e2e"])
    assert 3.5 * e1 < e2 < 4.5 * e1


@pytest.mark.asyncio
async def test_error_rate_returns_configured_status(sim) -> None:
    cfg = sim.make_config(faults=Faults(error_rate=1.0, error_status=503))
    async with SimCluster(1, config=cfg) as c, aiohttp.ClientSession() as s:
        url = c.urls[0]
        for stream in (False, True):
            st, h, body = await sim.chat(s, url, "x", stream=stream)
            assert st == 503 and body["error"]["code"] == 503 and h["x-sim-server"]
        async with s.post(f"{url}/sim/faults", json={"error_rate": 0.5, "error_status": 500}) as r:
            assert r.status == 200
        codes = [(await sim.chat(s, url, "x", max_tokens=1))[0] for _ in range(40)]
        assert set(codes) == {200, 500} and 8 <= codes.count(500) <= 32
        async with s.post(f"{url}/sim/faults", json={"reset": True}) as r:
            assert (await r.json())["error_rate"] == 0.0
        assert (await sim.chat(s, url, "x"))[0] == 200


@pytest.mark.asyncio
async def test_hang_never_answers_but_health_does(sim) -> None:
    async with SimCluster(1, config=sim.make_config()) as c, aiohttp.ClientSession() as s:
        url = c.urls[0]
        async with s.post(f"{url}/sim/faults", json={"hang": True}) as r:
            assert r.status == 200
        with pytest.raises(asyncio.TimeoutError):
            await sim.chat(s, url, "x", max_tokens=2, timeout=0.3)
        async with s.get(f"{url}/health") as r:
            assert r.status == 200
        async with s.post(f"{url}/sim/faults", json={"hang": False}) as r:
            assert r.status == 200
        assert (await sim.chat(s, url, "x", max_tokens=2))[0] == 200


async def refused(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(f"{url}/health") as r:
            await r.read()
        return False
    except aiohttp.ClientConnectorError:
        return True


@pytest.mark.asyncio
async def test_crash_cuts_streams_refuses_and_restart_serves(sim) -> None:
    async with SimCluster(2, config=sim.make_config(0.5)) as c, aiohttp.ClientSession() as s:
        url = c.urls[0]
        srv = c.servers[0]
        # Long stream in flight when the crash happens.
        stream_task = asyncio.create_task(sim.chat(s, url, "long", max_tokens=2000, stream=True))
        await asyncio.sleep(0.1)
        await srv.crash()
        with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                            aiohttp.ClientConnectionError)):
            await stream_task
        assert await refused(s, url)
        assert not srv.alive and srv.state()["alive"] is False
        # The other server is unaffected.
        assert (await sim.chat(s, c.urls[1], "x", max_tokens=2))[0] == 200
        await srv.restart()
        st, h, _ = await sim.chat(s, url, "x", max_tokens=2)
        assert st == 200 and h["x-sim-server"] == str(c.ports[0])
        state = await sim.state(s, url)
        assert state["crashes"] == 1 and state["generation_tokens"] == 2  # fresh engine


@pytest.mark.asyncio
async def test_crash_and_restart_via_admin_port(sim) -> None:
    async with SimCluster(2, config=sim.make_config()) as c, aiohttp.ClientSession() as s:
        admin = f"http://127.0.0.1:{c.admin_port}"
        async with s.post(f"{admin}/sim/servers/1/crash") as r:
            assert r.status == 200 and (await r.json())["alive"] is False
        assert await refused(s, c.urls[1])
        async with s.get(f"{admin}/sim/servers") as r:
            assert [x["alive"] for x in await r.json()] == [True, False]
        async with s.post(f"{admin}/sim/servers/{c.ports[1]}/restart") as r:
            assert r.status == 200 and (await r.json())["alive"] is True
        assert (await sim.chat(s, c.urls[1], "x", max_tokens=1))[0] == 200
        # Self-crash with auto restart through the server's own admin route.
        async with s.post(f"{c.urls[0]}/sim/crash", json={"restart_after_s": 0.3}) as r:
            assert r.status == 200
        await asyncio.sleep(0.1)
        assert await refused(s, c.urls[0])
        for _ in range(100):
            await asyncio.sleep(0.05)
            if c.servers[0].alive:
                break
        assert (await sim.chat(s, c.urls[0], "x", max_tokens=1))[0] == 200
        # Faults for every server at once.
        async with s.post(f"{admin}/sim/faults", json={"slowdown": 2.0}) as r:
            assert [f["slowdown"] for f in await r.json()] == [2.0, 2.0]
        async with s.post(f"{admin}/sim/servers/9/crash") as r:
            assert r.status == 404
