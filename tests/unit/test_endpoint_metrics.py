"""endpoint_metrics: the /metrics parser, the Higress filter chain, least/most, rate_limit,
staleness and missing metrics. States are constructed directly; one test scrapes a real
local HTTP server."""

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest

from extproc.config import ConfigError, policy_config
from extproc.runtime import parse_config
from extproc.core import RequestContext
from extproc.core import Endpoint
from core_sim import env
from extproc.policies import registry
from extproc.core import Fallback
from extproc.policies.endpoint_metrics import EndpointMetricsConfig
from extproc.signals.metrics import EndpointMetrics, LoraState, parse_metrics

FIXTURE = Path("/work/shared/fixtures/vllm-0.32-metrics.txt")
EPS = (Endpoint("10.0.0.1:1"), Endpoint("10.0.0.2:1"), Endpoint("10.0.0.3:1"))
A, B, C = (e.address for e in EPS)


# -- parser ---------------------------------------------------------------------------
@pytest.mark.skipif(not FIXTURE.exists(), reason="shared fixture missing")
def test_parser_reads_the_real_vllm_032_page():
    text = FIXTURE.read_text()
    m = parse_metrics(text, extra=["vllm:prefix_cache_hits_total", "vllm:e2e_request_latency_seconds_count"])
    assert m.running == 0.0 and m.waiting == 0.0 and m.kv == 0.0
    assert m.values["vllm:kv_cache_usage_perc"] == 0.0
    assert "vllm:gpu_cache_usage_perc" not in m.values  # gone in current vLLM; kv comes from the new name
    assert m.models == frozenset({"tiny"})
    assert m.lora is None  # LoRA off on that server
    assert m.get("vllm:prefix_cache_hits_total") > 0
    assert m.get("vllm:e2e_request_latency_seconds_count") > 0


def test_parser_with_a_modified_fixture_sees_values_not_prefix_lookalikes():
    text = FIXTURE.read_text() if FIXTURE.exists() else ""
    text = text.replace('vllm:num_requests_waiting{engine="0",model_name="tiny"} 0.0',
                        'vllm:num_requests_waiting{engine="0",model_name="tiny"} 7.0')
    text = text.replace('vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="capacity"} 0.0',
                        'vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="capacity"} 99.0')
    if FIXTURE.exists():
        assert parse_metrics(text).waiting == 7.0


MULTI = """# HELP vllm:num_requests_running x
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="base"} 3.0
vllm:num_requests_running{engine="1",model_name="base"} 4.0
vllm:num_requests_waiting{engine="0",model_name="base"} 1.0
vllm:num_requests_waiting{engine="1",model_name="base"} 5.0 1700000000000
vllm:num_requests_waiting_by_reason{engine="1",model_name="base",reason="capacity"} 500.0
vllm:gpu_cache_usage_perc{engine="0",model_name="base"} 0.2
vllm:gpu_cache_usage_perc{engine="1",model_name="base"} 0.4
vllm:lora_requests_info{max_lora="2",running_lora_adapters="old",waiting_lora_adapters=""} 100.0
vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql,chat",waiting_lora_adapters="math"} 200.0
vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""} 150.0
vllm:num_preemptions_total{engine="0",model_name="base"} 2
vllm:num_preemptions_total{engine="1",model_name="base"} 3"""


def test_parser_sums_engines_and_reads_legacy_kv_and_latest_lora_series():
    m = parse_metrics(MULTI, extra=["vllm:num_preemptions_total"])
    assert m.running == 7.0 and m.waiting == 6.0          # summed over engines, timestamp ignored
    assert m.kv == pytest.approx(0.3)                       # old name accepted; fraction averaged
    assert m.get("vllm:kv_cache_usage_perc") == pytest.approx(0.3)
    assert m.get("vllm:num_preemptions_total") == 5.0
    assert m.models == frozenset({"base"})
    assert m.lora == LoraState(frozenset({"sql", "chat", "math"}), 2)  # newest series (value = time)


def test_parser_accepts_sglang_names():
    text = ('sglang:num_running_reqs{model_name="m",tp_rank="0"} 2\n'
            'sglang:num_queue_reqs{model_name="m",tp_rank="0"} 9\n'
            'sglang:token_usage{model_name="m",tp_rank="0"} 0.25\n')
    m = parse_metrics(text)
    assert (m.running, m.waiting, m.kv) == (2.0, 9.0, 0.25)
    assert m.get("vllm:num_requests_waiting") == 9.0  # a vLLM target_metric works on SGLang


@pytest.mark.parametrize("flavor, legacy", [("vllm", True), ("sglang", False)])
def test_parser_on_the_simulators_pages(flavor, legacy):
    from vllmsim.metrics import EngineMetrics as M

    sim = M("base", block_size=16, num_gpu_blocks=100, flavor=flavor, legacy_gpu_cache=legacy,
            lora_enabled=flavor == "vllm", max_loras=3)
    text = sim.render(running=3, waiting=2, kv_usage=0.5, used_tokens=800, total_tokens=1600,
                      running_loras=["sql"], waiting_loras=["chat"])
    m = parse_metrics(text)
    assert (m.running, m.waiting, m.kv) == (3.0, 2.0, 0.5)
    if flavor == "vllm":
        assert m.lora == LoraState(frozenset({"sql", "chat"}), 3)
        assert m.values["vllm:gpu_cache_usage_perc"] == 0.5


def test_parser_missing_everything():
    m = parse_metrics("# nothing here\nfoo 1\n")
    assert m.running is None and m.waiting is None and m.kv is None and m.lora is None


# -- policy helpers ---------------------------------------------------------------------
def make(metric_policy="default", **kw):
    cfg = EndpointMetricsConfig(metric_policy=metric_policy, **kw)
    cls = registry.get("metrics_based")
    return cls(cfg, env("endpoint_metrics"))


def feed(p, states):
    """Scrape results, as the scraper service hands them to the load view."""
    for a, m in states.items():
        p.env.load.on_scrape(a, m, requested_at=m.at)


def st(waiting=0, running=0, kv=0.0, lora=None, models=("base",), at=None, **extra):
    vals = {"vllm:num_requests_waiting": waiting, "vllm:num_requests_running": running,
            "vllm:kv_cache_usage_perc": kv, **extra}
    vals = {k: float(v) for k, v in vals.items() if v is not None}
    return EndpointMetrics(vals, lora, frozenset(models), at if at is not None else time.monotonic())


def ctx(model="base"):
    c = RequestContext("r", {})
    c.body = ('{"model": "%s", "messages": []}' % model).encode()
    return c


def picks(p, states, n=60, model="base", eps=EPS):
    async def go():
        feed(p, states)
        out = []
        for _ in range(n):
            for a, m in states.items():  # keep them fresh
                m.at = time.monotonic()
            d = await p.pick(ctx(model), eps)
            out.append(d.address if isinstance(d, Endpoint) else d)
        return out
    return Counter(asyncio.run(go()))


# -- default chain -------------------------------------------------------------------------
def test_default_keeps_least_queued_band_then_lowest_kv():
    p = make()
    assert p.needs_body
    # waiting band: [0, 0 + (40-0)//3] = [0, 13] -> A and B; KV band among them -> B
    got = picks(p, {A: st(waiting=0, kv=0.9), B: st(waiting=12, kv=0.1), C: st(waiting=40, kv=0.0)})
    assert got == {B: 60}


def test_default_picks_at_random_among_equals():
    got = picks(make(), {A: st(), B: st(), C: st()}, n=300)
    assert set(got) == {A, B, C} and min(got.values()) > 50


def test_default_queue_band_comes_before_kv():
    # band [0, 0 + 2/3]: only the least-queued endpoint survives, whatever its KV
    got = picks(make(), {A: st(waiting=0, kv=0.9), B: st(waiting=1, kv=0.0), C: st(waiting=2, kv=0.0)})
    assert got == {A: 60}


def test_default_when_everyone_is_queued_past_50():
    got = picks(make(), {A: st(waiting=60, kv=0.5), B: st(waiting=100, kv=0.0), C: st(waiting=61, kv=0.1)})
    # band [60, 60 + 40//3 = 73] -> A, C; lowest KV band [0.1, 0.1 + 0.4/2] -> C
    assert got == {C: 60}


def test_default_lora_affinity_only_for_adapter_requests():
    lora_a = LoraState(frozenset({"sql"}), 2)
    lora_free = LoraState(frozenset(), 2)
    lora_full = LoraState(frozenset({"x", "y"}), 2)
    states = {A: st(waiting=10, lora=lora_a), B: st(waiting=0, lora=lora_free), C: st(waiting=0, lora=lora_full)}
    assert picks(make(), states, model="sql") == {A: 60}           # has it loaded (affinity)
    got = picks(make(), states, model="base")                      # base model: no LoRA step
    assert set(got) == {B, C}
    # an adapter loaded nowhere: endpoints with a free slot (B); C is full
    assert picks(make(), states, model="new-adapter") == {B: 60}


def test_default_ignores_lora_when_no_lora_metrics():
    got = picks(make(), {A: st(waiting=5), B: st(waiting=0), C: st(waiting=5)}, model="some-adapter")
    assert got == {B: 60}


def test_default_without_a_usable_body_still_routes_by_load():
    p = make()

    async def go():
        feed(p, {A: st(waiting=9), B: st(waiting=0), C: st(waiting=9)})
        c = RequestContext("r", {})
        c.body = b"{not json"
        return await p.pick(c, EPS)
    assert asyncio.run(go()) == EPS[1]


# -- least / most -------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"])
def test_least_and_most_on_any_core_metric(metric):
    lo, mid, hi = (st(waiting=v, running=v, kv=v / 10) for v in (1, 5, 9))
    assert picks(make("least", target_metric=metric), {A: mid, B: lo, C: hi}) == {B: 60}
    assert picks(make("most", target_metric=metric), {A: mid, B: lo, C: hi}) == {C: 60}


def test_least_on_an_arbitrary_metric_and_does_not_need_the_body():
    p = make("least", target_metric="vllm:num_preemptions_total")
    assert not p.needs_body
    assert "vllm:num_preemptions_total" in p.scraper.spec.extra
    states = {A: st(**{"vllm:num_preemptions_total": 30}), B: st(**{"vllm:num_preemptions_total": 1}),
              C: st(**{"vllm:num_preemptions_total": 20})}
    assert picks(p, states) == {B: 60}


# -- rate_limit over a time window ---------------------------------------------------------------
def test_rate_limit_caps_a_hosts_share_within_the_window_and_forgets_after_it():
    p = make("least", target_metric="vllm:num_requests_running", rate_limit=0.5, rate_limit_window=0.3)
    states = {A: st(running=0), B: st(running=5), C: st(running=9)}
    got = picks(p, states, n=100)
    assert got[A] <= 52 and got[A] >= 45  # the best host gets at most its share, not all
    without = picks(make("least", target_metric="vllm:num_requests_running"), states, n=100)
    assert without == {A: 100}
    time.sleep(0.35)  # the window is time, not "the last 100 picks": history expires
    share = next(f for f in p.profile.filters if f.name == "pick_share").share
    assert share.over(0.5) == set()  # every old pick has left the window
    assert picks(p, states, n=1) == {A: 1}


# -- unknown and missing data -------------------------------------------------------------------
def test_stale_endpoint_is_unknown_not_zero():
    p = make("least", target_metric="vllm:num_requests_running", stale_after=1.0)

    async def go():
        now = time.monotonic()
        # A looks idle but its data is 5 s old: it must not win on a stale zero.
        feed(p, {A: st(running=0, at=now - 5), B: st(running=3, at=now), C: st(running=7, at=now)})
        return [await p.pick(ctx(), EPS) for _ in range(20)]
    assert set(asyncio.run(go())) == {EPS[1]}
    assert p.stats["stale_endpoints"] == 20


def test_nothing_known_falls_back():
    p = make()

    async def go():
        feed(p, {A: st(at=time.monotonic() - 10)})
        return await p.pick(ctx(), EPS)
    assert asyncio.run(go()) == Fallback("metrics_unavailable")
    assert p.stats["metrics_unavailable"] == 1


def test_missing_metric_does_not_disable_the_policy():
    p = make()
    states = {A: st(waiting=0, kv=None), B: st(waiting=0, kv=0.5), C: st(waiting=30, kv=0.0)}
    got = picks(p, states)
    assert got == {B: 60}  # decided on waiting, then KV among those that export it
    assert p.stats["missing:vllm:kv_cache_usage_perc"] > 0
    # No endpoint exports waiting at all: the queue filters are skipped, KV still decides.
    p2 = make()
    got = picks(p2, {A: st(waiting=None, kv=0.7), B: st(waiting=None, kv=0.1), C: st(waiting=None, kv=0.9)})
    assert got == {B: 60}
    assert p2.stats["missing:vllm:num_requests_waiting"] > 0
    # least on a metric nobody has: still routes (randomly), counted
    p3 = make("least", target_metric="vllm:nope")
    assert sum(picks(p3, {A: st(), B: st(), C: st()}, n=30).values()) == 30
    assert p3.stats["missing:vllm:nope"] == 30


# -- config ---------------------------------------------------------------------------
def test_higress_config_is_accepted_with_string_rate_limit():
    cfg = policy_config(EndpointMetricsConfig, {"metric_policy": "least", "target_metric": "vllm:num_requests_waiting",
                                                "rate_limit": "0.6"})
    assert cfg.rate_limit == 0.6 and cfg.scrape_interval == 0.1 and cfg.stale_after == 1.0
    c = parse_config("routes: {r: {lb_policy: metrics_based, lb_config: {metric_policy: default, rate_limit: '0.6'},"
                     " endpoints: {static: ['1.2.3.4:1']}}}")
    assert c.routes["r"].lb_policy == "metrics_based"


@pytest.mark.parametrize("lb_config, needle", [
    ("{}", "metric_policy"),
    ("{metric_policy: fastest}", "metric_policy"),
    ("{metric_policy: least}", "target_metric"),
    ("{metric_policy: default, rate_limit: 1.5}", "rate_limit"),
    ("{metric_policy: default, rate_limit: '0'}", "rate_limit"),
    ("{metric_policy: default, scrape_interval: 2, stale_after: 1}", "stale_after"),
])
def test_bad_config_is_rejected(lb_config, needle):
    with pytest.raises(ConfigError) as ei:
        parse_config(f"routes: {{r: {{lb_policy: endpoint_metrics, lb_config: {lb_config}, endpoints: {{static: ['1.2.3.4:1']}}}}}}")
    assert needle in str(ei.value)


# -- the scraper against a real HTTP server ----------------------------------------------------
def test_scraper_fetches_goes_stale_on_failure_and_recovers():
    from aiohttp import web

    page = {"status": 200, "running": 4}

    async def metrics(_req):
        if page["status"] != 200:
            return web.Response(status=page["status"])
        return web.Response(text=f'vllm:num_requests_running{{engine="0",model_name="m"}} {page["running"]}\n')

    async def go():
        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        ep = (Endpoint(f"127.0.0.1:{port}"),)
        p = make("least", target_metric="vllm:num_requests_running", scrape_interval=0.02, stale_after=0.2)
        await p.env.scrapes.start()
        await p.start()
        try:
            first = await p.pick(ctx(), ep)            # never scraped yet: nothing known
            p.on_candidates(ep)                        # discovery names the endpoint: scraping starts
            await asyncio.sleep(0.15)
            second = await p.pick(ctx(), ep)
            assert p.scraper.get(ep[0].address).running == 4
            page["status"] = 500
            await asyncio.sleep(0.35)                  # past stale_after with only failures
            third = await p.pick(ctx(), ep)
            page["status"] = 200
            await asyncio.sleep(0.15)
            fourth = await p.pick(ctx(), ep)
            return first, second, third, fourth, p.env.scrapes.failures.get(ep[0].address, 0)
        finally:
            await p.close()
            await asyncio.sleep(0.05)
            assert not p.env.scrapes._tasks  # nobody reads it any more: its scraper stopped
            await p.env.scrapes.close()
            await runner.cleanup()

    first, second, third, fourth, failures = asyncio.run(go())
    assert first == Fallback("metrics_unavailable")
    assert isinstance(second, Endpoint)
    assert third == Fallback("metrics_unavailable")
    assert isinstance(fourth, Endpoint)
    assert failures >= 3
