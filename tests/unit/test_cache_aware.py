"""Block-level prefix routing: the chain keys, the block tree, cache_aware, estimated_ttft
and its online cost model."""

from __future__ import annotations

import asyncio
import json
import random
import time
import tracemalloc
from collections import Counter

import pytest

from core_sim import done, env, route
from extproc.config import policy_config
from extproc.core import Endpoint, RequestContext
from extproc.policies import registry
from extproc.signals.prefix_blocks import chain_keys, request_blocks, seed_of
from extproc.signals.ttft_model import TtftModel
from extproc.state.block_index import BlockIndex

EPS = tuple(Endpoint(f"10.0.0.{i}:8000") for i in range(1, 5))
A = [e.address for e in EPS]


# -- chain keys ---------------------------------------------------------------------------
def test_chain_keys_share_exactly_the_common_leading_blocks():
    a = b"x" * 640 + b"A" * 640
    b = b"x" * 640 + b"B" * 640
    ka, kb = chain_keys(a, 64, 1), chain_keys(b, 64, 1)
    assert len(ka) == 20 and (ka[:10] == kb[:10]).all() and not (ka[10:] == kb[10:]).any()
    assert (chain_keys(a, 64, 2)[:10] != ka[:10]).all()          # another seed (model): no sharing
    assert len(chain_keys(b"y" * 63, 64, 1)) == 0                 # only full blocks count
    assert len(set(chain_keys(b"z" * 64 * 50, 64, 1).tolist())) == 50  # equal blocks, distinct prefixes


def test_sharing_inside_one_message_counts_and_keys_are_stable():
    doc = lambda tail: {"model": "m", "messages": [{"role": "system", "content": "S" * 100},  # noqa: E731
                                                 {"role": "user", "content": "document " * 200 + tail}]}
    k1, k2 = request_blocks(doc("first question"), 64), request_blocks(doc("second one"), 64)
    assert len(k1) > 20 and (k1[:20] == k2[:20]).all()   # the shared document inside one user message
    again = json.loads(json.dumps(doc("first question"), indent=2))  # re-serialised by another client
    assert (request_blocks(again, 64) == k1).all()
    assert (request_blocks({**doc("first question"), "model": "other"}, 64)[:1] != k1[:1]).all()
    assert len(request_blocks({"model": "m", "prompt": "p" * 6400}, 64)) == 100
    assert len(request_blocks({"model": "m"}, 64)) == 0
    assert seed_of("chat", "m") == seed_of("chat", "m") != seed_of("chat", "n")


def test_a_220_kb_prompt_is_hashed_without_a_python_loop_per_block():
    doc = {"model": "m", "messages": [{"role": "user", "content": "lorem ipsum dolor " * 12_500}]}
    request_blocks(doc, 64)
    t0 = time.perf_counter()
    for _ in range(20):
        k = request_blocks(doc, 64)
    per = (time.perf_counter() - t0) / 20
    assert len(k) == 225_001 // 64
    assert per < 0.01, per   # ~0.1 ms here; a per-block Python loop with a hash call is ~3 ms


# -- the block tree --------------------------------------------------------------------------
def test_every_endpoints_match_counts_and_depth_is_a_binary_search():
    idx = BlockIndex(max_blocks=1000)
    keys = list(range(1, 101))
    idx.record(keys[:30], A[0])
    idx.record(keys[:70], A[1])
    idx.record(keys, A[2])
    assert [idx.depth(keys, a) for a in A] == [30, 70, 100, 0]
    assert idx.deepest(keys) == 100 and idx.deepest([999]) == 0
    assert set(idx.holders(keys[0])) == {A[0], A[1], A[2]}


def test_bounded_size_evicts_deep_blocks_before_their_ancestors():
    idx = BlockIndex(max_blocks=50)
    idx.record(list(range(100, 140)), A[0])     # 40 blocks
    idx.record(list(range(200, 230)), A[1])     # 30 more: 20 evicted, the oldest chain's deepest first
    assert len(idx) == 50 and idx.evicted == 20
    assert idx.depth(list(range(100, 140)), A[0]) == 20     # still a prefix: closure holds
    assert idx.depth(list(range(200, 230)), A[1]) == 30


def test_ttl_expiry():
    t = [0.0]
    idx = BlockIndex(ttl=10, clock=lambda: t[0])
    idx.record([1, 2, 3], A[0])
    t[0] = 5
    idx.record([1, 9], A[1])                    # touches 1 again
    t[0] = 12
    assert idx.expire() == 2 and idx.depth([1, 2, 3], A[0]) == 1 and idx.depth([1, 9], A[1]) == 2


def test_two_instances_agree_and_memory_per_million_blocks_is_bounded():
    doc = {"model": "m", "messages": [{"role": "user", "content": "shared " * 4000}]}
    one, two = BlockIndex(), BlockIndex()
    one.record(request_blocks(doc, 64), A[0])
    two.record(request_blocks(json.loads(json.dumps(doc)), 64), A[0])
    assert one._nodes.keys() == two._nodes.keys()         # deterministic: same keys anywhere
    tracemalloc.start()
    big = BlockIndex(max_blocks=200_000)
    for i in range(0, 200_000, 1000):
        big.record(range(i * 7919, i * 7919 + 1000), A[i % 4])
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    per_million = used / len(big) * 1e6
    assert len(big) == 200_000 and per_million < 300e6, per_million   # measured ~190 MB / million


# -- cache_aware --------------------------------------------------------------------------------
def make(name, **lb):
    cls = registry.get(name)
    p = cls(policy_config(cls.Config, lb), env(name))
    p.on_candidates(EPS)
    return p


def req(system, user):
    c = RequestContext("r", {})
    c.body = json.dumps({"model": "m", "messages": [{"role": "system", "content": system},
                                                     {"role": "user", "content": user}]}).encode()
    return c


def run(coro):
    return asyncio.run(coro)


def test_cache_aware_sticks_to_the_prefix_and_yields_when_imbalanced():
    p = make("cache_aware", balance_abs_threshold=3, balance_rel_threshold=0.5)

    async def go():
        first = await route(p, req("system " * 200, "q0"), EPS)
        await asyncio.sleep(0)                  # the tree records after the decision
        held = []
        for i in range(3):                      # three in flight on the prefix's endpoint
            c = req("system " * 200, f"q{i + 1}")
            assert (await route(p, c, EPS)).address == first.address
            held.append(c)
            await asyncio.sleep(0)
        c = req("system " * 200, "one more")    # 4 in flight there, 0 elsewhere: imbalanced
        other = await route(p, c, EPS)
        return first, other
    first, other = run(go())
    assert other.address != first.address and p.stats["imbalanced"] == 1


def test_cache_aware_weights_zero_and_fastdeploy_keys():
    from extproc.runtime import parse_config

    cfg = parse_config("routes: {r: {lb_policy: cache_aware, endpoints: {static: ['1.2.3.4:1']}, lb_config: "
                       "{hit-ratio-weight: 0, load-balance-weight: 1, balance-abs-threshold: 2, "
                       "balance-rel-threshold: 0.3, cache-block-size: 32, eviction-interval-secs: 5, "
                       "eviction-duration-mins: 1, waiting-weight: 3}}}")
    c = policy_config(registry.get("cache_aware").Config, cfg.routes["r"].lb_config)
    assert (c.hit_ratio_weight, c.cache_block_size, c.waiting_weight) == (0, 32, 3)
    p = make("cache_aware", hit_ratio_weight=0)
    assert not p.needs_body and p.prefix is None          # weight 0: the term is off, no body read
    got = Counter(run(route(p, req("s", "u"), EPS)).address for _ in range(40))
    assert len(got) == 4


def test_blocks_inside_one_message_route_together():
    p = make("cache_aware")
    doc = "retrieved document " * 300

    async def go():
        out = []
        for q in ("what is x?", "what is y?", "summarise"):
            c = RequestContext("r", {})
            c.body = json.dumps({"model": "m", "prompt": doc + q}).encode()
            out.append((await route(p, c, EPS)).address)
            done(p, c)
            await asyncio.sleep(0)
        return out
    out = run(go())
    assert len(set(out)) == 1 and p.stats["hit"] == 2


# -- estimated_ttft -------------------------------------------------------------------------------
def test_cost_model_calibrates_online_from_observed_ttft():
    m = TtftModel(per_token=1e-4, base=0.05, per_running=0.0, min_samples=10)
    rng = random.Random(3)
    for _ in range(400):                         # truth: 10 ms + 20 us/token + 2 ms per running seq
        f = (rng.uniform(0, 20_000), rng.uniform(0, 30))
        m.observe(f, 0.010 + 2e-5 * f[0] + 0.002 * f[1] + rng.gauss(0, 0.002))
    base, per_token, per_running = m.theta
    assert abs(per_token - 2e-5) < 2e-6 and abs(per_running - 0.002) < 3e-4 and abs(base - 0.010) < 0.005
    assert m.predict((10_000, 10)) == pytest.approx(0.23, rel=0.1)
    m2 = TtftModel(min_samples=50)
    for _ in range(10):
        m2.observe((1000, 1), -5.0)              # too few (and absurd) samples: defaults stand
    assert m2.theta == TtftModel().theta


def test_backlog_drains_at_the_prefill_rate():
    t = [0.0]
    m = TtftModel(per_token=1e-4, clock=lambda: t[0])  # 10k tokens/s
    m.sent("a", 5000)
    t[0] = 0.2
    assert m.backlog("a") == pytest.approx(3000)
    m.sent("a", 1000)
    t[0] = 1.0
    assert m.backlog("a") == 0 and m.backlog("b") == 0


def test_estimated_ttft_prefers_the_cache_holder_until_its_backlog_outweighs_the_hit():
    p = make("estimated_ttft", sample=0.0, rel=0.0, abs_s=0.0)
    scorer = p.profile.scorers[0]
    prompt = "long shared system prompt " * 400   # ~2,600 tokens: ~0.16 s of prefill by default

    async def go():
        home = await route(p, req(prompt, "q"), EPS)
        await asyncio.sleep(0.3)                        # its prefill backlog has drained
        back = await route(p, req(prompt, "again"), EPS)
        burst = [(await route(p, req(prompt, f"q{i}"), EPS)).address for i in range(6)]
        return home.address, back.address, burst
    home, back, burst = run(go())
    assert back == home                                 # the cached prefix wins once the backlog is gone
    assert len(set(burst)) > 1                          # a burst's backlog sends some elsewhere
    assert scorer.model.backlog(home) > 0


def test_first_token_samples_reach_the_model():
    p = make("estimated_ttft", sample=1.0)
    assert p.first_token_sample == 1.0
    c = req("s " * 100, "u")
    run(route(p, c, EPS))
    scorer = p.profile.scorers[0]
    n = scorer.model.samples
    p.on_first_token(c, 0.123)
    assert scorer.model.samples == n + 1


def test_cache_aware_defaults_keep_affinity_when_a_few_requests_wait():
    """A few waiting requests on the prefix's endpoint (each counts waiting-weight = 10)
    are not an imbalance at the default thresholds: the prefix keeps its endpoint. With
    the old default (8) one waiting request flipped the policy to process_tokens."""
    from extproc.signals.metrics import EndpointMetrics

    def scrape_all(p, busy, waiting):
        now = p.env.load.clock()
        for e in EPS:
            w = waiting if e.address == busy else 0
            p.env.load.on_scrape(e.address, EndpointMetrics(
                {"vllm:num_requests_waiting": w, "vllm:num_requests_running": 4, "vllm:kv_cache_usage_perc": 0.2},
                at=now, block_size=16, num_blocks=10_000), requested_at=now)

    for abs_threshold, stays in ((None, True), (8, False)):
        p = make("cache_aware", **({} if abs_threshold is None else {"balance_abs_threshold": abs_threshold}))

        async def go():
            c = req("system " * 200, "q0")
            first = await route(p, c, EPS)
            done(p, c)
            await asyncio.sleep(0)                  # the tree records after the decision
            scrape_all(p, first.address, waiting=3)
            return first, await route(p, req("system " * 200, "q1"), EPS)
        first, second = run(go())
        assert p.stats.get("imbalanced", 0) == (0 if stays else 1), (abs_threshold, p.stats)
        if stays:
            assert second.address == first.address and p.stats["hit"] == 1
