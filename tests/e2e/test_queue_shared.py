"""The gateway queue shared by two replicas through Redis: two gateways (Envoy + ai-lb each)
in front of the same simulated servers keep one line."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

import harness as h

pytestmark = pytest.mark.e2e

ROUTES = {"llm": {"lb_policy": "least_request", "endpoints": {"cluster": "llm_backends"},
                  "queue": {"saturation": {"max_inflight": 1}, "max_wait": 20}}}


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    t = h.TwoGateways(tmp_path_factory.mktemp("q2"))
    t.start_ai_lb(0, ROUTES)
    t.start_ai_lb(1, ROUTES)
    yield t
    t.stop()


async def _post(s, url, max_tokens, tag, delay, timeout=30.0):
    await asyncio.sleep(delay)
    try:
        async with s.post(url, json=h.chat_body(f"q {tag}", max_tokens=max_tokens),
                          timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            await r.read()
            return {"tag": tag, "status": r.status, "end": time.monotonic()}
    except Exception as e:  # noqa: BLE001
        return {"tag": tag, "status": repr(e), "end": time.monotonic()}


def run(specs):
    async def go():
        async with aiohttp.ClientSession() as s:
            return await asyncio.gather(*(_post(s, *x) for x in specs))
    return asyncio.run(go())


def _slots_in_use(two) -> int:
    return sum(int(v) for v in two.r.hgetall(b"{ailb:llm|llm_backends|queue}:total").values())


async def _until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_a_request_queued_on_one_replica_is_served_before_a_later_one_on_the_other(two):
    u0, u1 = two.url(0), two.url(1)

    async def go():
        async with aiohttp.ClientSession() as s:
            # Fill the three backends (one slot each, cluster-wide) from both gateways ...
            # (of different lengths, so the slots free one at a time)
            busy = [asyncio.ensure_future(_post(s, u, n, f"busy{i}", 0.0))
                    for i, (u, n) in enumerate(((u0, 4000), (u1, 8000), (u0, 12000)))]
            await _until(lambda: _slots_in_use(two) == 3)
            # ... then queue "older" on gateway 1 and "newer" on gateway 0.
            older = asyncio.ensure_future(_post(s, u1, 8, "older", 0.0))
            await _until(lambda: two.r.zcard(b"{ailb:llm|llm_backends|queue}:line") == 1)
            newer = asyncio.ensure_future(_post(s, u0, 8, "newer", 0.0))
            await _until(lambda: two.r.zcard(b"{ailb:llm|llm_backends|queue}:line") == 2)
            return await asyncio.gather(*busy, older, newer)
    res = {r["tag"]: r for r in asyncio.run(go())}
    assert all(r["status"] == 200 for r in res.values()), res
    assert res["older"]["end"] < res["newer"]["end"], res            # the first freed slot went to "older"
    assert res["busy0"]["end"] < res["older"]["end"] < res["newer"]["end"], res  # freed by busy0, then by older
    for i in (0, 1):
        m = two.metrics(i)
        assert h.metric_value(m, "ai_lb_queue_local_total") == 0      # Redis decided, not the replicas alone
        assert h.metric_value(m, "ai_lb_fallbacks_total") == 0
    time.sleep(0.2)
    assert _slots_in_use(two) == 0                                    # every slot given back


def test_redis_killed_while_requests_are_queued_none_lost_none_hung(two):
    u0, u1 = two.url(0), two.url(1)
    specs = [(u0, 6000, "busy0", 0.0), (u1, 6000, "busy1", 0.0), (u0, 6000, "busy2", 0.05)]
    specs += [(u0 if i % 2 else u1, 8, f"q{i}", 0.3) for i in range(6)]

    async def go():
        async with aiohttp.ClientSession() as s:
            tasks = [asyncio.ensure_future(_post(s, *x)) for x in specs]
            await asyncio.sleep(0.5)
            two.redis.kill()                     # requests are waiting in the shared line
            return await asyncio.gather(*tasks)
    t0 = time.monotonic()
    try:
        res = asyncio.run(go())
    finally:
        two.redis.start()
    assert time.monotonic() - t0 < 25                                       # none hung
    assert all(r["status"] == 200 for r in res), [(r["tag"], r["status"]) for r in res]  # none lost
    assert sum(h.metric_value(two.metrics(i), "ai_lb_queue_local_total") for i in (0, 1)) >= 1
