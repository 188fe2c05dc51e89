"""The scheduling framework: assumed load, error ejection, the load index, profiles,
each plugin, preset compositions, and their config."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from core_sim import done, env, route
from extproc.config import ConfigError
from extproc.core import Endpoint, Fallback, RequestContext
from extproc.policies import registry
from extproc.runtime import parse_config
from extproc.scheduling import Profile, Snapshot, spec
from extproc.signals.load import LoadView
from extproc.signals.load_index import LoadIndex
from extproc.signals.metrics import EndpointMetrics

EPS = tuple(Endpoint(f"10.0.0.{i}:8000") for i in range(1, 5))
A = [e.address for e in EPS]


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def scrape(view, addr, at, waiting=0, running=0, kv=0.0, num_blocks=1000):
    view.on_scrape(addr, EndpointMetrics({"vllm:num_requests_waiting": waiting, "vllm:num_requests_running": running,
                                          "vllm:kv_cache_usage_perc": kv}, at=at, block_size=16,
                                         num_blocks=num_blocks), requested_at=at)


# -- assumed load --------------------------------------------------------------------------
def test_a_pick_is_assumed_until_a_later_scrape_counts_it_or_it_ends():
    clk = Clock()
    v = LoadView(clock=clk)
    scrape(v, "a", at=clk.t, waiting=2, running=5)
    r = v.record("a")
    t1 = v.begin("a", tokens=160)                 # after that scrape: not in it
    assert (r.waiting(clk.t, 1.0), r.total(clk.t, 1.0)) == (3, 8)
    assert r.assumed_blocks == 10                 # 160 tokens / 16 per block
    assert v.get("a").kv(clk.t, 1.0) == pytest.approx(0.01)
    clk.t += 0.05
    scrape(v, "a", at=clk.t - 0.1, waiting=2, running=5)  # requested before the pick: still assumed
    assert r.assumed_requests == 1
    clk.t += 0.05
    scrape(v, "a", at=clk.t, waiting=3, running=5)        # requested after: the engine counts it now
    assert (r.assumed_requests, r.assumed_blocks, r.waiting(clk.t, 1.0)) == (0, 0, 3)
    v.end(t1)                                     # it ends before the next scrape: taken off
    assert r.total(clk.t, 1.0) == 7 and r.ended_since_scrape == 1
    scrape(v, "a", at=clk.t + 0.1, waiting=2, running=5)
    assert r.ended_since_scrape == 0 and r.total(clk.t + 0.1, 1.0) == 7
    t2 = v.begin("a")
    v.end(t2)                                     # ended while still assumed: nothing left behind
    assert (r.assumed_requests, r.requests, r.ended_since_scrape) == (0, 0, 0)


def test_without_fresh_metrics_the_local_count_is_the_estimate():
    clk = Clock()
    v = LoadView(clock=clk)
    v.begin("a")
    v.begin("a")
    r = v.record("a")
    assert r.total(clk.t, 1.0) == 2 and r.kv(clk.t, 1.0) is None
    scrape(v, "a", at=clk.t - 5, waiting=0, running=0)    # 5 s old: stale
    assert r.fresh(clk.t, 1.0) is None and r.total(clk.t, 1.0) == 2


def test_consecutive_upstream_errors_eject_with_backoff_and_a_success_forgives():
    clk = Clock()
    v = LoadView(clock=clk, eject_after=3)
    for _ in range(2):
        v.end(v.begin("a"), status=503)
    r = v.record("a")
    assert not r.ejected(clk.t)
    v.end(v.begin("a"), status=200)               # a success resets the run
    for _ in range(3):
        v.end(v.begin("a"), status=0)             # connection failures count too
    assert r.ejected(clk.t) and not r.ejected(clk.t + 1.01)
    clk.t += 1.01
    for _ in range(3):
        v.end(v.begin("a"), status=502)
    assert r.ejected(clk.t + 1.9) and not r.ejected(clk.t + 2.01)  # second time: 2 s
    v.end(v.begin("a"), status=404)               # a 4xx is the client's fault, not the endpoint's
    assert r.consecutive_errors == 0 and r.ejections == 0


# -- the load index -------------------------------------------------------------------------------
def test_index_follows_load_changes_and_breaks_ties_at_random():
    v = LoadView()
    idx = LoadIndex(v, lambda r: r.requests, rng=random.Random(1))
    addrs = [f"10.0.{i // 250}.{i % 250}:1" for i in range(1000)]
    idx.reset(addrs)
    held = [v.begin(a) for a in addrs[:999]]      # every endpoint but the last is busy
    assert idx.least(1) == [addrs[999]]
    v.end(held[0])
    assert set(idx.least(2)) == {addrs[0], addrs[999]}
    firsts = Counter(idx.least(1)[0] for _ in range(200))
    assert set(firsts) == {addrs[0], addrs[999]} and min(firsts.values()) > 60
    assert len(idx.least(5)) == 5 and idx.key(addrs[5]) == 1
    idx.close()
    v.begin(addrs[999])                            # closed: no longer followed
    assert idx.key(addrs[999]) is None


# -- profiles and plugins -------------------------------------------------------------------------
def snap_of(view, eps=EPS, body=None, headers=None):
    ctx = RequestContext("r", headers or {})
    ctx.body = body
    return Snapshot(ctx, view, eps)


def test_filters_fail_soft_unless_strict_and_weights_combine():
    v = LoadView()
    for a in A[:2]:
        scrape(v, a, at=v.clock(), waiting=60)
    p = Profile([spec("filter", "queue_below").build()], [spec("scorer", "requests").build()],
                spec("picker", "max_score").build())
    s = snap_of(v, EPS[:2])                        # both queues >= 50: the filter would empty the set
    assert p.run(s) in s.candidates and p.stats["filter_empty:queue_below"] == 1
    strict = Profile([spec("filter", "fresh_metrics").build()], [], spec("picker", "max_score").build())
    assert strict.run(snap_of(LoadView())) is None  # nothing scraped: strict filter ends the decision
    scrape(v, A[2], at=v.clock(), waiting=0, kv=0.9)
    scrape(v, A[3], at=v.clock(), waiting=5, kv=0.1)
    s = snap_of(v, EPS[2:])
    q = [spec("scorer", "queue", weight=1).build(), spec("scorer", "kv_cache", weight=3).build()]
    assert Profile([], q, spec("picker", "max_score").build()).run(s).address == A[3]  # KV outweighs queue
    q = [spec("scorer", "queue", weight=1).build(), spec("scorer", "kv_cache", weight=0).build()]
    assert Profile([], q, spec("picker", "max_score").build()).run(s).address == A[2]  # weight 0: off


def test_pickers():
    v = LoadView()
    s = snap_of(v)
    cands = s.candidates
    mx = spec("picker", "max_score").build()
    assert Counter(mx.pick(s, cands, [1, 1, 0, 0]).address for _ in range(200)).keys() == {A[0], A[1]}
    wr = spec("picker", "weighted_random", sharpness=20).build()
    got = Counter(wr.pick(s, cands, [1.0, 0.95, 0.0, 0.0]).address for _ in range(2000))
    assert got[A[0]] > got[A[1]] > 400 and got[A[2]] + got[A[3]] < 20  # near-ties share, far ones almost never
    flat = spec("picker", "weighted_random", sharpness=0).build()
    assert len(Counter(flat.pick(s, cands, [1, 0, 0, 0]).address for _ in range(400))) == 4
    tk = spec("picker", "top_k", k=2).build()
    assert Counter(tk.pick(s, cands, [3, 2, 1, 0]).address for _ in range(200)).keys() == {A[0], A[1]}


def test_scorers_and_filters_read_assumed_load():
    v = LoadView()
    for a in A:
        scrape(v, a, at=v.clock() - 0.01, waiting=0, running=2, kv=0.5)
    v.begin(A[0], tokens=16_000)                  # 1,000 blocks assumed on A[0]: KV full
    v.begin(A[1])
    v.begin(A[1])
    s = snap_of(v)
    scores = spec("scorer", "fd_metrics", waiting_weight=10).build().score(s, s.candidates)
    assert scores[2] == scores[3] == 1.0 and scores[1] == 0.0  # two assumed waiting on A[1]
    assert spec("scorer", "queue").build().score(s, s.candidates)[1] == 0.0
    kept = spec("filter", "kv_room", max_usage=0.95).build().filter(s, s.candidates)
    assert [c.address for c in kept] == A[1:]
    assert spec("scorer", "tokens").build().score(s, s.candidates)[0] == 0.0
    band = spec("filter", "band", metric="vllm:num_requests_waiting").build().filter(s, s.candidates)
    assert {c.address for c in band} == {A[2], A[3]}  # band [0, 0 + 2/4]: the assumed picks are queued


def test_snapshot_estimates_the_prompt_from_the_body_or_content_length():
    v = LoadView()
    assert snap_of(v, body=b"x" * 4000).prompt_tokens == 1000
    assert snap_of(v, headers={"content-length": "8000"}).prompt_tokens == 2000
    assert snap_of(v, headers={"content-length": "junk"}).prompt_tokens == 0


# -- presets -----------------------------------------------------------------------------------------
def make(name, **lb):
    cls = registry.get(name)
    cfg = parse_config("routes: {r: {lb_policy: %s, lb_config: %s, endpoints: {static: [%s]}}}"
              % (name, lb or "{}", ", ".join(f"'{a}'" for a in A))).routes["r"].lb_config
    from extproc.config import policy_config

    p = cls(policy_config(cls.Config, cfg), env(name))
    p.on_candidates(EPS)
    return p


def route_many(p, n, eps=EPS, hold=True):
    async def go():
        ctxs = []
        for _ in range(n):
            c = RequestContext("r", {"content-length": "4000"})
            ctxs.append((c, await route(p, c, eps)))
        if not hold:
            for c, _ in ctxs:
                done(p, c)
        return [d for _, d in ctxs]
    return asyncio.run(go())


@pytest.mark.parametrize("name", ["fd_metrics_score", "endpoint_metrics", "least_kv_cache", "scheduler"])
def test_32_requests_inside_one_scrape_interval_do_not_herd(name):
    """Every endpoint looked idle in the last scrape; 32 decisions before the next one must
    see each other (assumed load) and spread, not all pick the same endpoint."""
    lb = {"endpoint_metrics": {"metric_policy": "default"},
          "scheduler": {"scorers": [{"name": "queue", "weight": 1}, {"name": "kv_cache", "weight": 1}]}}.get(name, {})
    p = make(name, **lb)
    now = p.env.load.clock() - 0.01
    scrape(p.env.load, A[0], at=now, waiting=0, running=0, kv=0.1, num_blocks=400)     # looks idle
    for a in A[1:]:
        scrape(p.env.load, a, at=now, waiting=1, running=4, kv=0.5, num_blocks=400)    # look busy
    got = Counter(e.address for e in route_many(p, 32))
    assert got[A[0]] <= 16, got                   # a herd puts all 32 on the idle-looking one
    assert len(got) == 4, got


def test_request_num_and_power_of_two_and_process_tokens():
    p = make("request_num")
    got = Counter(e.address for e in route_many(p, 40))
    assert set(got.values()) == {10}              # fewest in flight, exactly
    p = make("power_of_two")
    held = Counter(e.address for e in route_many(p, 400))
    assert max(held.values()) - min(held.values()) <= 40  # two choices keep it tight
    p = make("process_tokens")
    big = RequestContext("r", {"content-length": str(4 * 100_000)})
    first = asyncio.run(route(p, big, EPS))
    got = Counter(e.address for e in route_many(p, 30))
    assert first.address not in got               # 100k tokens in flight outweigh 30 small prompts


def test_least_kv_cache_prefers_room():
    p = make("least_kv_cache", max_usage=0.9)
    now = p.env.load.clock()
    for a, kv in zip(A, (0.95, 0.5, 0.2, 0.21)):
        scrape(p.env.load, a, at=now - 0.01, kv=kv, num_blocks=100_000)
    got = Counter(e.address for e in route_many(p, 200, hold=False))
    assert A[0] not in got and got[A[2]] + got[A[3]] > 190 and min(got[A[2]], got[A[3]]) > 40


def test_least_kv_cache_breaks_near_equal_kv_by_requests_in_flight():
    """Low, near-equal KV usage (0.1 % apart) is no signal: held requests decide, so the
    picks stay as even as round robin's instead of a uniform random draw. FlexLB's pure
    KV choice (requests_weight: 0) is still there.

    The picker draws from ``random``: seeded here, because 80 unseeded pure-KV picks came
    out within 4 of even in 5 of 40 seeds (the test then failed at random); with 400 picks
    that was 1 in 40, and the tie-broken spread stays 0."""
    state = random.getstate()
    random.seed(20261202)
    try:
        for weight, tight in ((0.05, True), (0.0, False)):
            p = make("least_kv_cache", requests_weight=weight)
            now = p.env.load.clock()
            for a, kv in zip(A, (0.020, 0.021, 0.022, 0.021)):
                scrape(p.env.load, a, at=now - 0.01, kv=kv, num_blocks=1_000_000)
            got = Counter(e.address for e in route_many(p, 400))      # held: in flight grows where picked
            spread = max(got.values()) - min(got.values())
            assert (spread <= 4) == tight, (weight, got)
    finally:
        random.setstate(state)


def test_failing_endpoint_stops_attracting_traffic():
    p = make("least_request")

    async def go():
        seen = Counter()
        for i in range(60):
            c = RequestContext("r", {})
            e = await route(p, c, EPS)
            seen[e.address] += 1
            done(p, c, status=503 if e.address == A[0] else 200)
        return seen
    seen = asyncio.run(go())
    assert seen[A[0]] == 3                        # three fast failures, then ejected
    assert p.needs_response_headers               # it asks Envoy for the status


def test_metric_presets_fall_back_when_nothing_is_known():
    p = make("fd_metrics_score")
    assert isinstance(asyncio.run(route(p, RequestContext("r", {}), EPS)), Endpoint)  # local counts stand in
    p = make("endpoint_metrics", metric_policy="default")
    assert asyncio.run(route(p, RequestContext("r", {}), EPS)) == Fallback("metrics_unavailable")


# -- config ---------------------------------------------------------------------------------------------
def test_scheduler_lb_config_is_validated_with_field_paths_in_one_pass():
    with pytest.raises(ConfigError) as ei:
        parse_config("routes:\n  llm:\n    lb_policy: scheduler\n    endpoints: {static: ['1.2.3.4:1']}\n"
                     "    lb_config:\n"
                     "      filters: [{name: nope}, {name: queue_below, threshold: -1}]\n"
                     "      scorers: [{name: queue, weight: -2}, {name: kv_cache, bogus: 1}]\n"
                     "      picker: {name: top_k, k: 0}\n")
    text = "\n".join(ei.value.problems)
    for needle in ("routes.llm.lb_config.filters[0].name: unknown filter 'nope'",
                   "routes.llm.lb_config.filters[1].threshold: must be > 0",
                   "routes.llm.lb_config.scorers[0].weight: expected a number >= 0",
                   "routes.llm.lb_config.scorers[1].bogus: unknown field",
                   "routes.llm.lb_config.picker.k: must be >= 1"):
        assert needle in text, text
    cfg = parse_config("routes:\n  llm:\n    lb_policy: scheduler\n    endpoints: {static: ['1.2.3.4:1']}\n"
                       "    lb_config: {filters: [healthy], scorers: [{name: fd_metrics, weight: 2, waiting-weight: 4}]}\n")
    assert cfg.routes["llm"].lb_config["scorers"][0]["weight"] == 2


def test_fastdeploy_key_names_are_accepted():
    cfg = parse_config("routes: {r: {lb_policy: fd_metrics_score, lb_config: {waiting-weight: 3.5}, "
                       "endpoints: {static: ['1.2.3.4:1']}}}")
    from extproc.config import policy_config

    c = policy_config(registry.get("fd_metrics_score").Config, cfg.routes["r"].lb_config)
    assert c.waiting_weight == 3.5
    with pytest.raises(ConfigError, match="given twice"):
        parse_config("routes: {r: {lb_policy: fd_metrics_score, lb_config: {waiting-weight: 3, waiting_weight: 4}, "
                     "endpoints: {static: ['1.2.3.4:1']}}}")


def test_events_a_plugin_counts_when_told_of_the_pick_reach_the_policys_stats():
    from extproc.scheduling import plugins
    from extproc.scheduling.framework import Scorer

    @plugins.register
    class CountsOnPick(Scorer):
        name = "test_counts_on_pick"

        def score(self, snap, cands):
            snap.count("scored")
            return [1.0] * len(cands)

        def picked(self, snap, chosen):
            snap.count("picked_note")

    p = make("scheduler", scorers=[{"name": "test_counts_on_pick"}])
    route_many(p, 3)
    assert (p.stats.get("scored"), p.stats.get("picked_note")) == (3, 3)
