"""The shared signal layer: one scraper per endpoint whoever reads it, the pick-share
window, the load view's accounting, and state stores shared per URL."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from extproc.config import ConfigError, build_config
from extproc.signals import LoadView, PickShare, ScrapeSpec, ScraperService
from extproc.state import LocalCounts, StateStores


async def _metrics_server(hits: list[float]):
    async def metrics(_req):
        hits.append(asyncio.get_running_loop().time())
        return web.Response(text='vllm:num_requests_running{engine="0",model_name="m"} 3\n')

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


@pytest.mark.asyncio
async def test_one_scraper_per_endpoint_however_many_readers():
    hits: list[float] = []
    runner, addr = await _metrics_server(hits)
    seen = []
    svc = ScraperService(on_sample=lambda a, m, at: seen.append(a))
    await svc.start()
    try:
        slow = svc.subscribe(ScrapeSpec(interval=0.2))
        fast = svc.subscribe(ScrapeSpec(interval=0.05))
        slow.want([addr])
        fast.want([addr])
        await asyncio.sleep(0.5)
        assert len(svc._tasks) == 1                   # one task for two readers
        assert 6 <= len(hits) <= 14                   # at the faster reader's pace (~10), not both (~12 + 3)
        assert slow.get(addr).running == 3 and fast.get(addr).running == 3
        assert seen and set(seen) == {addr}           # every sample reaches the load view
        fast.close()                                  # one reader left: still scraped, at its pace
        n = len(hits)
        await asyncio.sleep(0.45)
        assert 1 <= len(hits) - n <= 4
        slow.close()                                  # nobody left: the scraper stops
        await asyncio.sleep(0.3)
        assert not svc._tasks
        n = len(hits)
        await asyncio.sleep(0.3)
        assert len(hits) == n
    finally:
        await svc.close()
        await runner.cleanup()


@pytest.mark.asyncio
async def test_a_replacing_reader_keeps_the_view_warm():
    """A reload subscribes the new policy before the old one closes: no cold gap."""
    hits: list[float] = []
    runner, addr = await _metrics_server(hits)
    svc = ScraperService()
    await svc.start()
    try:
        old = svc.subscribe(ScrapeSpec(interval=0.05))
        old.want([addr])
        await asyncio.sleep(0.2)
        new = svc.subscribe(ScrapeSpec(interval=0.05))
        new.want([addr])
        assert new.get(addr) is not None              # warm from the first moment
        old.close()
        await asyncio.sleep(0.2)
        assert new.get(addr) is not None and len(svc._tasks) == 1
    finally:
        await svc.close()
        await runner.cleanup()


def test_pick_share_window():
    t = [0.0]
    s = PickShare(window=10, clock=lambda: t[0])
    for _ in range(6):
        s.record("a")
    for _ in range(4):
        s.record("b")
    assert s.over(0.6) == {"a"}          # a: 7/11 > 0.6 with one more; b: 5/11
    assert s.over(0.6, min_total=20) == set()
    assert s.over(1.0) == set()
    t[0] = 10.5                          # the window has passed: old picks no longer count
    assert s.over(0.5) == set()


def test_load_view_counts_requests_and_tokens_exactly_once():
    v = LoadView()
    t1 = v.begin("a", tokens=100)
    t2 = v.begin("a", tokens=50)
    v.begin("b")
    assert (v.requests("a"), v.tokens("a"), v.requests("b"), v.tokens("b")) == (2, 150, 1, 0)
    v.end(t1)
    v.end(t2)
    v.end(t2)                            # a ticket is released once, however often it is ended
    assert (v.requests("a"), v.tokens("a")) == (0, 0)


@pytest.mark.asyncio
async def test_memory_counts_are_the_core_counts_and_redis_stores_are_shared_per_url():
    stores = StateStores()
    c = stores.counts("memory")
    assert isinstance(c, LocalCounts) and stores.counts("memory") is c
    stores.inflight.inc("a")
    assert await c.pick_least("p", ["a", "b"]) == ("b", 1)
    assert await c.pick_least("p", ["a"], max_count=1) == (None, 1)
    r1 = stores.counts("redis://127.0.0.1:1/0", 0.05)
    assert stores.counts("redis://127.0.0.1:1/0", 0.05) is r1
    assert stores.counts("redis://127.0.0.1:1/0", 0.1) is not r1
    assert stores.local_prefix_index(10) is stores.local_prefix_index(10)
    await stores.close()


class _Catalog:
    """The smallest PolicyCatalog: config.py knows no policy of its own."""

    def names(self, lb_type=None):
        return ["only"] if lb_type in (None, "endpoint") else []

    def config_class(self, name):
        from extproc.policies.base import NoConfig

        return NoConfig

    def load_plugin(self, module):
        raise ImportError(module)


def test_config_validates_against_the_catalog_it_is_given():
    cfg = build_config({"routes": {"r": {"lb_policy": "only", "endpoints": {"static": ["1.2.3.4:5"]}}}}, _Catalog())
    assert cfg.routes["r"].lb_policy == "only" and cfg.routes["r"].pool == "r|static"
    with pytest.raises(ConfigError) as ei:
        build_config({"plugins": ["x"], "routes": {"r": {"lb_policy": "round_robin", "endpoints": {"static": ["1.2.3.4:5"]}}}},
                     _Catalog())
    assert any("plugins[0]" in p for p in ei.value.problems)
    assert any("unknown policy 'round_robin'" in p and "allowed: only" in p for p in ei.value.problems)


@pytest.mark.asyncio
async def test_policies_hear_of_their_candidates_from_discovery_not_from_traffic():
    from extproc.core import Endpoint
    from extproc.runtime import Runtime, parse_config

    rt = Runtime()
    await rt.apply(parse_config("server: {envoy_admin: 'http://127.0.0.1:1'}\nroutes:\n"
                                "  m: {lb_policy: endpoint_metrics, lb_config: {metric_policy: least, target_metric: x},"
                                " endpoints: {cluster: c}}\n"))
    sub = rt.routes["m"].policy.scraper
    assert sub.addresses == frozenset()          # nothing discovered yet
    rt.directory.update_clusters({"c": (Endpoint("10.0.0.1:1"), Endpoint("10.0.0.2:1", healthy=False))})
    rt.refresh_candidates()                      # what the gateway does when discovery changes
    assert sub.addresses == {"10.0.0.1:1"}       # healthy ones only, before any request
    await rt.apply(parse_config("server: {envoy_admin: 'http://127.0.0.1:1'}\nroutes:\n"
                                "  m: {lb_policy: endpoint_metrics, lb_config: {metric_policy: least, target_metric: y},"
                                " endpoints: {cluster: c}}\n"))
    new = rt.routes["m"].policy.scraper
    assert new is not sub and new.addresses == {"10.0.0.1:1"}  # a replacing policy starts with them
    await rt.close()
