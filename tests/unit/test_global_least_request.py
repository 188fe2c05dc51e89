"""global_least_request and its counts: memory store, and Redis (a real redis-server)."""

import asyncio
import time
from collections import Counter

import pytest

from core_sim import done, env, route
from extproc.core import Endpoint, Reject, RequestContext
from extproc.policies import registry
from extproc.policies.global_least_request import GlobalLeastRequestConfig as Config
from extproc.state.redis_conn import RedisConn
from extproc.state.redis_counts import RedisCounts, pool_keys
from aibench.redis_server import RedisServer

EPS = [Endpoint(f"10.0.0.{i}:8000") for i in range(1, 5)]
ADDRS = [e.address for e in EPS]


def policy(store="memory", **cfg):
    cls = registry.get("global_least_request")
    return cls(Config(**cfg), env("global_least_request", cluster="c", store=store))


@pytest.mark.asyncio
async def test_memory_picks_least_and_releases_once():
    p = policy()
    ctxs = [RequestContext("r", {}) for _ in range(8)]
    got = [await route(p, c, EPS) for c in ctxs]
    assert Counter(e.address for e in got) == {a: 2 for a in ADDRS}
    for c in ctxs[:4]:
        done(p, c)
    assert sum((await p.counts.counts(p.pool, ADDRS)).values()) == 4


@pytest.mark.asyncio
async def test_max_request_count_rejects_with_429_and_counts_nothing():
    p = policy(maxRequestCount=1)
    for _ in range(4):
        assert isinstance(await route(p, RequestContext("r", {}), EPS), Endpoint)
    d = await route(p, RequestContext("r", {}), EPS)
    assert isinstance(d, Reject) and d.status == 429 and "maxRequestCount=1" in d.message
    assert await p.counts.counts(p.pool, ADDRS) == {a: 1 for a in ADDRS}


def test_higress_redis_fields_build_the_store_url_and_validate():
    c = Config(serviceFQDN="redis.static", servicePort=6379, username="default", password="p@ss", database=2)
    assert c.store_url("memory") == "redis://default:p%40ss@redis.static:6379/2"
    assert Config().store_url("redis://x:1/0") == "redis://x:1/0"
    assert Config(serviceFQDN="r").store_url("memory") == "redis://r:6379/0"  # Redis's default port
    assert ("servicePort", "expected a port 1..65535") in Config(serviceFQDN="r", servicePort=0).validate()


@pytest.fixture
def redis_srv(tmp_path):
    r = RedisServer(tmp_path).start()
    yield r
    r.kill()


def counts(url, inst, lease=10.0, timeout=1.0):
    return RedisCounts(RedisConn(url, timeout, cooldown=0.3), lease_ttl=lease, instance=inst)


async def totals(rc, pool="p"):
    raw = await rc.conn.client.hgetall(pool_keys(pool)[0])
    return {k.decode(): int(v) for k, v in raw.items()}


@pytest.mark.asyncio
async def test_two_instances_share_counts_and_a_burst_does_not_herd(redis_srv):
    a, b = counts(redis_srv.url, "A"), counts(redis_srv.url, "B")
    picks = await asyncio.gather(*([a.pick_least("p", ADDRS) for _ in range(50)] + [b.pick_least("p", ADDRS) for _ in range(50)]))
    c = Counter(addr for addr, _ in picks)
    assert sorted(c.values()) == [25, 25, 25, 25]  # atomic pick+increment: perfectly even
    assert await totals(a) == {x: 25 for x in ADDRS}
    for addr, _ in picks[:50]:
        await a.decr("p", addr)
    assert sum((await totals(a)).values()) == 50
    # A decrement this instance does not own never makes anything negative.
    for _ in range(3):
        await a.decr("p", ADDRS[0])
    assert all(v >= 0 for v in (await totals(a)).values())
    await a.conn.close(), await b.conn.close()


@pytest.mark.asyncio
async def test_dead_instance_counts_expire_with_its_lease(redis_srv):
    a, b = counts(redis_srv.url, "A", lease=0.5), counts(redis_srv.url, "B", lease=0.5)
    await b.start()  # B is alive: its heartbeat renews its lease
    for _ in range(8):
        await a.pick_least("p", ADDRS)  # A "crashes" holding 8 requests: no decrements, no heartbeat
    await b.pick_least("p", ADDRS)
    assert sum((await totals(b)).values()) == 9
    await asyncio.sleep(0.7)
    await b.pick_least("p", ADDRS)  # any decision reaps expired leases
    assert sum((await totals(b)).values()) == 2  # only B's own two remain
    await b.stop()
    await a.conn.close(), await b.conn.close()


@pytest.mark.asyncio
async def test_max_count_in_redis(redis_srv):
    a = counts(redis_srv.url, "A")
    for _ in range(4):
        assert (await a.pick_least("p", ADDRS, max_count=1))[0] is not None
    assert await a.pick_least("p", ADDRS, max_count=1) == (None, 1)
    assert sum((await totals(a)).values()) == 4
    await a.conn.close()


@pytest.mark.asyncio
async def test_redis_down_is_bounded_then_local_then_resynced(redis_srv):
    a = counts(redis_srv.url, "A", timeout=0.05)
    await a.start()
    await a.pick_least("p", ADDRS)
    redis_srv.kill()
    t0 = time.perf_counter()
    addr, _ = await a.pick_least("p", ADDRS)  # first failure: bounded by the timeout
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(20):
        await a.pick_least("p", ADDRS)       # breaker open: no waiting at all
    rest = (time.perf_counter() - t0) / 20
    assert addr in ADDRS
    assert first < 0.5 and rest < 0.01, (first, rest)
    assert sum(a.mine["p"].values()) == 22
    redis_srv.start()                          # Redis comes back empty
    await asyncio.sleep(0.4)                   # breaker cooldown
    await a.pick_least("p", ADDRS)             # first success triggers the resync
    await asyncio.sleep(0.2)
    assert sum((await totals(a)).values()) == 23
    await a.stop()
    await a.conn.close()
