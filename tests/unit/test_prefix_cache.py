import asyncio
import json
import uuid

import pytest

from extproc.config import ConfigError, EndpointsConfig, RouteConfig, policy_config
from extproc.runtime import parse_config
from extproc.core import RequestContext
from extproc.core import Endpoint
from extproc.policies import PolicyEnv, registry
from extproc.policies.prefix_cache import PrefixCacheConfig
from extproc.signals.prefix_keys import request_keys
from core_sim import done as core_done
from core_sim import route
from extproc.state.prefix_index import MemoryPrefixIndex
from extproc.state.redis_keys import prefix_key
from aibench.redis_server import RedisServer

EPS = [Endpoint("10.0.0.1:1"), Endpoint("10.0.0.2:1"), Endpoint("10.0.0.3:1")]
A = [e.address for e in EPS]


def keys(doc, route="r", cluster="c", **kw):
    return request_keys(doc, route, cluster, **kw)


def chat(*turns, model="m", system=None):
    """messages: system, then user/assistant alternating (turns = user, assistant, user, ...)."""
    msgs = [{"role": "system", "content": system}] if system else []
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return {"model": model, "messages": msgs}


# -- keys ------------------------------------------------------------------------------
def test_segments_close_at_each_user_message():
    k1 = keys(chat("u1"))
    k2 = keys(chat("u1", "a1", "u2"))
    k3 = keys(chat("u1", "a1", "u2", "a2", "u3"))
    assert len(k1) == 1 and len(k2) == 2 and len(k3) == 3
    assert k3[:2] == k2 and k2[:1] == k1  # a continuation extends the chain
    # a trailing assistant message (prefill) is a last, partial segment
    k = keys(chat("u1", "a1"))
    assert len(k) == 2 and k[0] == k1[0] and k[1] != k2[1]


def test_a_leading_system_prompt_is_a_segment_of_its_own():
    a = keys(chat("question one", system="shared system prompt"))
    b = keys(chat("another question", "ans", "more", system="shared system prompt"))
    c = keys(chat("question one", system="other system prompt"))
    assert len(a) == 2 and len(b) == 3
    assert a[0] == b[0] != c[0]          # same system prompt -> same first key
    assert a[1] != b[1] and a[1] != c[1]
    # consecutive system/developer messages form one segment; a lone system prompt is one key
    two = {"model": "m", "messages": [{"role": "system", "content": "s1"}, {"role": "developer", "content": "s2"},
                                      {"role": "user", "content": "u"}]}
    assert len(keys(two)) == 2
    assert len(keys({"model": "m", "messages": [{"role": "system", "content": "s"}]})) == 1


def test_chain_is_order_sensitive_and_equal_segments_do_not_cancel():
    ab, ba = keys(chat("a", "x", "b", system=None)), keys(chat("b", "x", "a", system=None))
    assert ab[1] != ba[1]
    xx, yy = keys(chat("x", "r", "x", system=None)), keys(chat("y", "r", "y", system=None))
    assert xx[1] != yy[1]  # XOR chaining would make both cancel to the same value
    assert xx[0] != xx[1]
    assert len(set(ab + ba + xx + yy)) == 8


def test_keys_are_namespaced_by_route_cluster_model_and_kind():
    base = keys(chat("u"))
    assert keys(chat("u", model="other")) != base
    assert keys(chat("u"), route="r2") != base
    assert keys(chat("u"), cluster="c2") != base
    assert keys(chat("u", system="other")) != base
    assert keys({"model": "m", "prompt": "user:u"}) != base


def test_content_as_list_of_parts():
    s = keys({"model": "m", "messages": [{"role": "user", "content": "hello world"}]})
    parts = keys({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hello world"}]}]})
    assert parts == s  # text parts hash like the equivalent string
    img = lambda u: keys({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hello world"}, {"type": "image_url", "image_url": {"url": u}}]}]})
    assert img("http://a/1.png") != s
    assert img("http://a/1.png") == img("http://a/1.png")
    assert img("http://a/1.png") != img("http://a/2.png")


def test_tool_call_messages_without_content_are_keyed():
    def conv(fn):
        return keys({"model": "m", "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {"name": fn, "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "1", "content": "sunny"},
            {"role": "user", "content": "thanks"}]})
    a, b = conv("get_weather"), conv("get_time")
    assert len(a) == 2 and a[0] == b[0] and a[1] != b[1]
    c = keys({"model": "m", "messages": [{"role": "user", "content": "weather?"},
                                         {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]})
    assert len(c) == 2


def test_completions_prompt_chunks():
    p = "x" * 300 + "y" * 300
    k = keys({"model": "m", "prompt": p})
    assert len(k) == 3
    longer = keys({"model": "m", "prompt": p + "z" * 100})
    assert longer[:2] == k[:2] and longer[2] != k[2]
    assert keys({"model": "m", "prompt": [p, "other"]}) == k  # a batch routes by its first prompt
    assert len(keys({"model": "m", "prompt": p}, chunk_chars=100)) == 6
    assert len(keys({"model": "m", "prompt": p}, max_depth=2)) == 2
    toks = keys({"model": "m", "prompt": list(range(200))})
    assert len(toks) == 4 and toks != keys({"model": "m", "prompt": list(range(1, 201))})
    assert keys({"model": "m"}) == [] and keys({"model": "m", "prompt": 3}) == []


def test_huge_prompt_is_fast_and_bounded():
    import time
    t0 = time.perf_counter()
    k = keys({"model": "m", "prompt": "a" * 2_000_000})
    assert len(k) == 1000 and time.perf_counter() - t0 < 2.0
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": "q" * 1000} for i in range(2000)]
    assert len(keys({"model": "m", "messages": msgs}, max_depth=50)) == 50


# -- memory index ----------------------------------------------------------------------
def test_memory_index_ttl_refresh_and_lru():
    now = [0.0]
    idx = MemoryPrefixIndex(max_entries=3, clock=lambda: now[0])
    idx.record_now("t", ["k1", "k2"], "h", ttl=10)
    now[0] = 8
    assert idx.match_now("t", ["k1", "k2"], ["h"], ttl=10) == (2, "h")  # refreshed to 18
    now[0] = 16
    assert idx.match_now("t", ["k1"], ["h"], ttl=10) == (1, "h")  # k1 -> 26; k2 still 18
    now[0] = 20
    assert idx.match_now("t", ["k1", "k2"], ["h"], ttl=10) == (1, "h")  # k2 expired
    assert idx.match_now("u", ["k1"], ["h"], ttl=10) == (0, None)  # other namespace
    idx.record_now("t", ["a", "b", "c"], "h", ttl=100)
    assert len(idx) == 3 and idx.get("t", "k1") is None  # least recently used evicted


# -- the policy --------------------------------------------------------------------------
def make(store="memory", route=None, cluster="llm", **lb):
    route = route or f"r-{uuid.uuid4().hex[:8]}"
    cls = registry.get("prefix_cache")
    rc = RouteConfig(name=route, lb_policy="prefix_cache", lb_config=lb, endpoints=EndpointsConfig(cluster=cluster))
    return cls(policy_config(cls.Config, lb), PolicyEnv.standalone(rc, store_url=store))


_HELD: dict = {}


async def busy(p, addr, n=1):
    """``n`` more requests in flight on ``addr``, counted where the policy reads load: the
    core's own counts (memory) or the shared Redis counts (another gateway's requests)."""
    for _ in range(n):
        if p.env.store_url == "memory":
            _HELD.setdefault((id(p), addr), []).append(p.env.load.begin(addr))
        else:
            await p.counts.incr(p.pool, addr)


async def unbusy(p, addr, n=1):
    for _ in range(n):
        if p.env.store_url == "memory":
            p.env.load.end(_HELD[(id(p), addr)].pop())
        else:
            await p.counts.decr(p.pool, addr)


def req(p, doc):
    ctx = RequestContext(p.env.route.name, {":path": "/v1/chat/completions"})
    ctx.body = json.dumps(doc).encode()
    return ctx


async def seed_keys(p, chain, host):
    """Record ``chain`` -> ``host`` where the policy will look: its local index, or Redis."""
    if p.redis is None:
        p.local.record_now(p.pool, chain, host, p.ttl)
        return
    for k in chain:
        await p.counts.conn.client.execute("SET", prefix_key(p.pool, k), host, "EX", int(p.ttl))


async def matched(p, chain, healthy=None):
    """(depth, endpoint) of ``chain`` as the policy's index holds it now."""
    healthy = set(healthy or A)
    if p.redis is None:
        return p.local.match_now(p.pool, chain, healthy, p.ttl)
    depth, host = 0, None
    for i, k in enumerate(chain):
        h = await p.counts.conn.client.execute("GET", prefix_key(p.pool, k))
        if h is None or h.decode() not in healthy:
            break
        depth, host = i + 1, h.decode()
    return depth, host


async def pick(p, doc, eps=EPS, done=True):
    ctx = req(p, doc)
    e = await route(p, ctx, eps)
    if done:
        core_done(p, ctx)
    return e.address


@pytest.fixture(params=["memory", "redis"])
def store(request, tmp_path):
    if request.param == "memory":
        yield "memory"
        return
    srv = RedisServer(tmp_path).start()
    yield srv.url
    srv.kill()


def test_config_accepts_higress_fields():
    c = policy_config(PrefixCacheConfig, {"serviceFQDN": "redis.svc", "servicePort": "6380", "username": "u",
                                          "password": "p@ss", "timeout": 20, "database": 2, "redisKeyTTL": 60})
    assert c.timeout == 20.0 and c.redisKeyTTL == 60 and c.servicePort == 6380
    p = make(**{"serviceFQDN": "redis.svc", "servicePort": 6380, "password": "p@ss", "database": 2})
    assert p.config.store_url(p.env.store_url) == "redis://:p%40ss@redis.svc:6380/2"
    m = make()
    assert m.config.store_url(m.env.store_url) == "memory" and m.config.redisKeyTTL == 1800 and m.config.timeout_s == 0.05
    with pytest.raises(ConfigError) as ei:
        parse_config("routes:\n  llm:\n    lb_policy: prefix_cache\n    endpoints: {static: ['1.2.3.4:1']}\n"
                     "    lb_config: {redisKeyTTL: 0, chunk_chars: -1, bogus: 1}\n")
    text = str(ei.value)
    assert "redisKeyTTL" in text and "chunk_chars" in text and "bogus" in text


def test_conversation_sticks_and_counts_are_balanced(store):
    async def go():
        p = make(store)
        await p.start()
        try:
            first = await pick(p, chat("hi"))
            turns = ["hi"]
            for i in range(4):
                turns += [f"answer {i}", f"question {i}"]
                assert await pick(p, chat(*turns)) == first
            assert p.stats["hit"] == 4 and p.stats["miss"] == 1
            assert p.stats["index_fallback"] == 0
            await asyncio.sleep(0.05)  # RedisCounts.release decrements in a task
            assert await p.counts.counts(p.pool, A) == {a: 0 for a in A}  # every incr got its decr
        finally:
            await p.close()
    asyncio.run(go())


def test_no_match_goes_to_least_loaded_and_is_counted(store):
    async def go():
        p = make(store)
        await p.start()
        try:
            for a, n in ((A[0], 2), (A[1], 1)):
                await busy(p, a, n)
            ctx = req(p, chat("fresh conversation"))
            e = await route(p, ctx, EPS)
            assert e.address == A[2]
            assert (await p.counts.counts(p.pool, A))[A[2]] == 1
            core_done(p, ctx)
            p.on_done(ctx)  # a second call must not count down twice
            await asyncio.sleep(0.05)
            assert (await p.counts.counts(p.pool, A)) == {A[0]: 2, A[1]: 1, A[2]: 0}
            # the prefix now sticks to A[2] even though it is no longer the least loaded
            await busy(p, A[2], 3)
            assert await pick(p, chat("fresh conversation", "a", "more")) == A[2]
        finally:
            await p.close()
    asyncio.run(go())


def test_deepest_healthy_match_wins_and_stale_is_overwritten(store):
    async def go():
        p = make(store)
        await p.start()
        try:
            doc = chat("u1", "a1", "u2", "a2", "u3")
            k = keys(doc, route=p.env.route.name, cluster="llm")
            await seed_keys(p, k[:1], A[0])
            await seed_keys(p, k[1:2], A[1])
            assert await pick(p, doc) == A[1]  # depth 2 beats depth 1
            assert await matched(p, k) == (3, A[1])  # depth 3 written with it
            # A[1] goes down: the walk stops at depth 1 (A[0]); depths 2..3 are rewritten.
            # A[0] is the busier one, so only the prefix match can send it there.
            await busy(p, A[0], 2)
            assert await pick(p, doc, eps=[EPS[0], EPS[2]]) == A[0]
            await unbusy(p, A[0], 2)
            assert await matched(p, k) == (3, A[0])
            # A[1] back: the conversation stays where it moved
            assert await pick(p, doc) == A[0]
            # A[0] down too: no healthy match, least loaded among what is left; all rewritten
            assert await pick(p, doc, eps=[EPS[2]]) == A[2]
            assert await matched(p, k) == (3, A[2])
            assert await pick(p, chat("u1", "a1", "u2", "a2", "u3", "a3", "u4")) == A[2]
        finally:
            await p.close()
    asyncio.run(go())


def test_routes_and_models_do_not_share_prefixes():
    async def go():
        p = make()
        await p.start()
        first = await pick(p, chat("shared", model="m1"))
        # same route, other model: no match, so it goes to the least loaded (any, idle)
        ctx = req(p, chat("shared", model="m2"))
        await route(p, ctx, EPS)
        core_done(p, ctx)
        assert (p.stats["hit"], p.stats["miss"], p.stats["index_fallback"]) == (0, 2, 0)
        await pick(p, chat("shared", model="m1"))
        assert p.stats["hit"] == 1
        q = make()  # another route on the same memory store
        await q.start()
        await pick(q, chat("shared", model="m1"))
        assert q.stats["hit"] == 0
        assert first in A
    asyncio.run(go())


def test_affinity_yields_when_its_endpoint_is_overloaded():
    async def go():
        p = make(balance_abs_threshold=2, balance_rel_threshold=1.5)
        await p.start()
        home = await pick(p, chat("hot prefix"))
        held = [req(p, chat("hot prefix", "a", f"turn {i}")) for i in range(3)]
        for ctx in held:                    # three in flight on the prefix's endpoint
            assert (await route(p, ctx, EPS)).address == home
        elsewhere = await pick(p, chat("hot prefix", "a", "one more"))
        assert elsewhere != home and p.stats["imbalanced"] == 1
        for ctx in held:
            core_done(p, ctx)
        assert await pick(p, chat("hot prefix", "a", "later")) in (home, elsewhere)  # affinity again
        assert p.stats["imbalanced"] == 1
    asyncio.run(go())


def test_completions_and_tool_calls_route_by_prefix():
    async def go():
        p = make(chunk_chars=64)
        await p.start()
        doc = {"model": "m", "prompt": "The quick brown fox. " * 20}
        first = await pick(p, doc)
        for i in range(3):
            doc = {"model": "m", "prompt": doc["prompt"] + f" more {i} " * 10}
            assert await pick(p, doc) == first
        msgs = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "w", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "1", "content": "sunny"}, {"role": "user", "content": "thanks"}]
        t = await pick(p, {"model": "m", "messages": msgs})
        msgs += [{"role": "assistant", "content": "welcome"}, {"role": "user", "content": "bye"}]
        assert await pick(p, {"model": "m", "messages": msgs}) == t
        assert p.stats["hit"] == 4
    asyncio.run(go())


def test_bad_body_falls_back_with_its_reason():
    from extproc.core import BodyError

    async def go():
        p = make()
        await p.start()
        ctx = RequestContext("r", {})
        ctx.body = b"not json"
        with pytest.raises(BodyError):
            await p.pick(ctx, EPS)
        # a body with nothing to key on is still routed (least loaded) and counted
        assert await pick(p, {"model": "m", "input": "x"}) in A
    asyncio.run(go())


# -- Redis ---------------------------------------------------------------------------------
def test_redis_keys_share_one_slot_and_ttl_is_refreshed(tmp_path):
    srv = RedisServer(tmp_path).start()

    async def go():
        p = make(srv.url, route="llm{x}", redisKeyTTL=100)
        await p.start()
        try:
            import redis.asyncio as aioredis

            r = aioredis.Redis.from_url(srv.url)  # an independent client to inspect the keys
            doc = chat("u1", "a1", "u2")
            await pick(p, doc)
            ks = sorted(x.decode() for x in await r.keys("*:pc:*"))
            assert len(ks) == 2
            everything = [x.decode() for x in await r.keys("*")]
            tags = {k[k.index("{"):k.index("}") + 1] for k in everything}
            assert tags == {"{ailb:llm_x_|llm}"}  # one hash tag for prefixes and counts: one slot
            for k in ks:
                assert 90 < await r.ttl(k) <= 100
                await r.expire(k, 5)
            await pick(p, doc)  # a match refreshes the TTL of the matched keys
            for k in ks:
                assert await r.ttl(k) > 90
            vals = {(await r.get(k)).decode() for k in ks}
            assert len(vals) == 1 and vals <= set(A)
        finally:
            await p.close()
    try:
        asyncio.run(go())
    finally:
        srv.kill()


def test_redis_down_uses_local_index_and_never_fails(tmp_path):
    srv = RedisServer(tmp_path).start()

    async def go():
        p = make(srv.url, timeout=30)
        await p.start()
        try:
            first = await pick(p, chat("hello"))
            srv.kill()
            # Redis gone: decisions use the local (write-through) index, within the bound
            import time
            t0 = time.perf_counter()
            assert await pick(p, chat("hello", "a", "again")) == first
            assert time.perf_counter() - t0 < 1.0
            assert p.stats["index_fallback"] >= 1
            assert await pick(p, chat("hello", "a", "again", "b", "more")) == first
        finally:
            await p.close()
    try:
        asyncio.run(go())
    finally:
        srv.kill()


def test_two_instances_share_prefixes_through_redis(tmp_path):
    srv = RedisServer(tmp_path).start()

    async def go():
        p = make(srv.url, route="shared")
        q = make(srv.url, route="shared")
        await p.start()
        await q.start()
        q.local = MemoryPrefixIndex()  # a separate process would not see p's local index
        try:
            a = await pick(p, chat("conversation 1"))
            assert await pick(q, chat("conversation 1", "x", "y")) == a
            assert q.stats["hit"] == 1
            assert q.redis is not None
        finally:
            await p.close()
            await q.close()
    try:
        asyncio.run(go())
    finally:
        srv.kill()
