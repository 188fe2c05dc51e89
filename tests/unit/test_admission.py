"""The gateway queue's line and gate: priorities, tenants, bounds, release, shedding."""

from __future__ import annotations

import asyncio
import time

import pytest

from extproc.admission.gate import Admitted, Gate, Queued, Rejected
from extproc.admission.queue import Line
from extproc.config import QueueConfig, SaturationConfig
from extproc.core import Endpoint, RequestContext
from extproc.signals.load import LoadView

EPS = (Endpoint("10.0.0.1:1"), Endpoint("10.0.0.2:1"))


def ctx(**headers):
    return RequestContext("r", {k.replace("_", "-"): v for k, v in headers.items()})


@pytest.mark.asyncio
async def test_line_strict_priority_fifo_and_tenants_take_turns():
    line = Line(("high", "normal", "low"), max_queued=10)
    order = [("low", "a"), ("normal", "a"), ("normal", "a"), ("normal", "b"), ("high", "c"), ("normal", "b")]
    ws = [line.push(c, t) for c, t in order]
    served = []
    while (w := line.head()) is not None:
        line.pop(w)
        served.append(ws.index(w))
    # high first; within normal, tenants a and b alternate; low last
    assert served == [4, 1, 3, 2, 5, 0]
    assert line.push("low") is not None and len(line) == 1
    full = Line(("x",), max_queued=1)
    assert full.push("x") is not None and full.push("x") is None


def gate(view, **q):
    sat = q.pop("sat", {"max_inflight": 1})
    g = Gate("r", QueueConfig(saturation=SaturationConfig(**sat), **q), view)
    g.on_candidates(EPS)
    return g


@pytest.mark.asyncio
async def test_held_until_an_endpoint_frees_then_released_in_order_one_at_a_time():
    v = LoadView()
    g = gate(v, class_header="x-priority")
    busy = [v.begin(e.address) for e in EPS]          # both endpoints at max_inflight 1
    q1 = await g.admit(ctx(x_priority="low"), EPS)
    q2 = await g.admit(ctx(x_priority="high"), EPS)
    assert isinstance(q1, Queued) and isinstance(q2, Queued) and len(g.line) == 2
    t1, t2 = asyncio.ensure_future(g.wait(q1)), asyncio.ensure_future(g.wait(q2))
    await asyncio.sleep(0)
    v.end(busy[0])                                    # one slot frees: the high one goes first
    await asyncio.sleep(0)
    assert t2.done() and not t1.done()
    a = t2.result()
    assert isinstance(a, Admitted) and [e.address for e in a.candidates] == [EPS[0].address]
    v.end(busy[1])                                    # another slot, but the grant is not counted yet
    await asyncio.sleep(0)
    assert not t1.done()                              # one free slot is never given twice
    v.begin(EPS[0].address)                           # the released request is counted ...
    g.settled(q2.waiter)                              # ... and the next may go
    await asyncio.sleep(0)
    assert t1.done() and isinstance(t1.result(), Admitted)


@pytest.mark.asyncio
async def test_newcomers_do_not_pass_the_line_and_room_admits_at_once():
    v = LoadView()
    g = gate(v)
    assert isinstance(await g.admit(ctx(), EPS), Admitted)  # room, nobody waiting
    held = [v.begin(e.address) for e in EPS]
    q = await g.admit(ctx(), EPS)
    v.end(held[0])                                    # room again, but someone waits: they go first
    assert isinstance(await g.admit(ctx(), EPS), Queued)
    assert q.waiter.future.done()


@pytest.mark.asyncio
async def test_full_line_is_429_and_a_long_wait_is_503_and_an_abort_frees_its_place():
    v = LoadView()
    g = gate(v, max_queued=1, max_wait=0.05, retry_after=7)
    for e in EPS:
        v.begin(e.address)
    q = await g.admit(ctx(), EPS)
    r = await g.admit(ctx(), EPS)
    assert isinstance(r, Rejected) and r.status == 429 and r.retry_after == 7
    r = await g.wait(q)
    assert isinstance(r, Rejected) and r.status == 503
    assert len(g.line) == 0 and g.shed == {("normal", "queue_full"): 1, ("normal", "timeout"): 1}
    q = await g.admit(ctx(), EPS)
    t = asyncio.ensure_future(g.wait(q))
    await asyncio.sleep(0)
    t.cancel()                                        # the client went away while waiting
    with pytest.raises(asyncio.CancelledError):
        await t
    assert len(g.line) == 0 and g.shed[("normal", "client_gone")] == 1
    assert sum(g.waited["normal"][:-1]) == 1          # the timed-out one was observed


@pytest.mark.asyncio
async def test_saturation_by_scraped_queue_kv_and_tokens():
    from extproc.signals.metrics import EndpointMetrics

    v = LoadView()
    g = gate(v, sat={"max_waiting": 2, "max_kv": 0.9, "max_tokens": 1000})
    a, b = EPS[0].address, EPS[1].address
    v.on_scrape(a, EndpointMetrics({"vllm:num_requests_waiting": 2, "vllm:kv_cache_usage_perc": 0.1}))
    v.on_scrape(b, EndpointMetrics({"vllm:num_requests_waiting": 0, "vllm:kv_cache_usage_perc": 0.95}))
    assert isinstance(await g.admit(ctx(), EPS), Queued)    # a: queue 2, b: KV 0.95 -> both full
    v.on_scrape(b, EndpointMetrics({"vllm:num_requests_waiting": 0, "vllm:kv_cache_usage_perc": 0.5}))
    assert [e.address for e in g.roomy(EPS)] == [b]
    v.begin(b, tokens=1000)                           # tokens in flight reach the limit
    assert g.roomy(EPS) == []


@pytest.mark.asyncio
async def test_class_from_the_model_and_close_rejects_waiters():
    v = LoadView()
    g = gate(v, class_by_model={"big": "low"})
    c = ctx()
    c.body = b'{"model": "big", "messages": []}'
    assert g.class_of(c) == "low" and g.class_of(ctx()) == "normal"
    for e in EPS:
        v.begin(e.address)
    q = await g.admit(ctx(), EPS)
    g.close()
    assert isinstance(await g.wait(q), Rejected)


# -- one line across replicas (a real redis-server) ----------------------------------------
from aibench.redis_server import RedisServer  # noqa: E402
from extproc.admission.redis_line import RedisLine  # noqa: E402
from extproc.admission.shared_gate import SharedGate  # noqa: E402
from extproc.state.redis_conn import RedisConn  # noqa: E402
from extproc.state.redis_counts import RedisCounts  # noqa: E402


@pytest.fixture
def redis_url(tmp_path):
    srv = RedisServer(tmp_path).start()
    yield srv
    srv.kill()


def replica(url, inst, **q):
    counts = RedisCounts(RedisConn(url, 0.2, cooldown=0.3), instance=inst)
    cfg = QueueConfig(saturation=SaturationConfig(max_inflight=1), **q)
    g = SharedGate("r", cfg, LoadView(), RedisLine(counts, "r|static"))
    g.on_candidates(EPS)
    return g


@pytest.mark.asyncio
async def test_two_replicas_keep_one_order_and_never_give_a_slot_twice(redis_url):
    a, b = replica(redis_url.url, "A"), replica(redis_url.url, "B")
    await a.start(), await b.start()
    try:
        got = [await a.admit(ctx(), EPS), await b.admit(ctx(), EPS)]   # both endpoints taken, one each
        assert all(isinstance(x, Admitted) for x in got) and {x.slot for x in got} == {e.address for e in EPS}
        qa = await a.admit(ctx(), EPS)                 # queued first, on replica A
        await asyncio.sleep(0.01)
        qb = await b.admit(ctx(), EPS)                 # queued later, on replica B
        assert isinstance(qa, Queued) and isinstance(qb, Queued)
        ta, tb = asyncio.ensure_future(a.wait(qa)), asyncio.ensure_future(b.wait(qb))
        await asyncio.sleep(0.1)
        b.release(got[1].slot)                         # a slot frees on B's side ...
        await asyncio.sleep(0.2)
        assert ta.done() and not tb.done()             # ... and goes to the older request, on A
        a.release(got[0].slot)
        await asyncio.sleep(0.2)
        assert tb.done()
        slots = {ta.result().slot, tb.result().slot}
        assert slots == {e.address for e in EPS}       # each endpoint's one slot given once
        a.release(ta.result().slot), b.release(tb.result().slot)
        await asyncio.sleep(0.1)
        # A burst from both replicas at once: at most one request per endpoint is admitted.
        burst = await asyncio.gather(*([a.admit(ctx(), EPS) for _ in range(10)] + [b.admit(ctx(), EPS) for _ in range(10)]))
        assert sum(isinstance(x, Admitted) for x in burst) == 2
    finally:
        a.close(), b.close()
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_redis_down_the_replica_queues_locally_and_keeps_serving(redis_url):
    a = replica(redis_url.url, "A", max_wait=2)
    await a.start()
    try:
        redis_url.kill()
        x = await a.admit(ctx(), EPS)                  # degraded: the local view decides
        assert isinstance(x, Admitted) and x.slot is None
        for e in EPS:
            a.view.begin(e.address)
        q = await a.admit(ctx(), EPS)
        assert isinstance(q, Queued)
        t = asyncio.ensure_future(a.wait(q))
        await asyncio.sleep(0.01)
        a.view.end(a.view.begin(EPS[0].address))      # a change on the endpoint's load ...
        r = a.view.record(EPS[0].address)
        for tk in list(r.pending):                     # ... that frees it
            a.view.end(tk)
        await asyncio.sleep(0.05)
        assert t.done() and isinstance(t.result(), Admitted)
        assert a.degraded["normal"] >= 2 and not a.shed
    finally:
        a.close()
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_a_grant_at_the_deadline_is_used_and_the_line_keeps_granting():
    """A slot granted in the same loop step as the waiter's deadline: before, the wait
    answered 503 and the grant was never settled, so the gate granted nothing ever again
    (a bench at 1.3x load served 137 of 7,114 requests). Now the grant is used, and a
    settled waiter always lets the next one go."""
    v = LoadView()
    g = gate(v, max_wait=0.05)
    busy = [v.begin(e.address) for e in EPS]
    q = await g.admit(ctx(), EPS)
    loop = asyncio.get_running_loop()
    t = asyncio.ensure_future(g.wait(q))
    await asyncio.sleep(0)                            # the wait's deadline is scheduled ...
    # ... and the grant 10 ms before it; the loop is then held past both, so one loop step
    # runs the grant and then the deadline, before the waiter resumes (the order the bug
    # needed, made certain instead of left to clock reads).
    loop.call_at(q.waiter.arrived + 0.04 - time.monotonic() + loop.time(), v.end, busy[0])
    loop.call_soon(time.sleep, 0.12)
    a = await t
    assert isinstance(a, Admitted), a
    busy[0] = v.begin(a.candidates[0].address)        # routed there
    g.settled(q.waiter)
    q2 = await g.admit(ctx(), EPS)                    # nothing frees: it waits ...
    t2 = asyncio.ensure_future(g.wait(q2))
    await asyncio.sleep(0)
    v.end(busy[1])                                    # ... and is granted: the line still moves
    assert isinstance(await asyncio.wait_for(t2, 1), Admitted)


@pytest.mark.asyncio
async def test_a_waiter_settled_without_waiting_leaves_the_line():
    """The processor settles every waiter, also one whose hold could not be written (the
    client is gone): it leaves the line, and the next waiter is granted."""
    v = LoadView()
    g = gate(v)
    busy = [v.begin(e.address) for e in EPS]
    q1, q2 = await g.admit(ctx(), EPS), await g.admit(ctx(), EPS)
    g.settled(q1.waiter)                              # never waited
    assert len(g.line) == 1
    t2 = asyncio.ensure_future(g.wait(q2))
    await asyncio.sleep(0)
    v.end(busy[0])
    assert isinstance(await asyncio.wait_for(t2, 1), Admitted)


@pytest.mark.asyncio
async def test_envoys_hold_limit_caps_the_wait_and_a_limit_too_short_to_hold_is_a_503():
    """Envoy stops waiting for a held message at its max_message_timeout and, with
    failure_mode_allow, sends the request on unrouted: the gate holds 1 s less than that,
    and answers 503 itself when that leaves nothing."""
    v = LoadView()
    g = gate(v, max_wait=20)
    busy = [v.begin(e.address) for e in EPS]
    assert g.max_wait == 20
    g.set_hold_limit(1.3)
    assert g.max_wait == pytest.approx(0.3)
    q = await g.admit(ctx(), EPS)
    assert isinstance(q, Queued) and q.max_wait == pytest.approx(0.3)
    t0 = time.monotonic()
    r = await g.wait(q)
    assert isinstance(r, Rejected) and r.status == 503 and 0.25 < time.monotonic() - t0 < 1.0
    g.set_hold_limit(0.3)            # message_timeout only (no max_message_timeout): no overrides
    r = await g.admit(ctx(), EPS)
    assert isinstance(r, Rejected) and r.status == 503 and "max_message_timeout" in r.message
    assert g.shed == {("normal", "timeout"): 1, ("normal", "cannot_hold"): 1} and len(g.line) == 0
    v.end(busy[0])
    assert isinstance(await g.admit(ctx(), EPS), Admitted)   # room: admitted, whatever the limit
    g.set_hold_limit(None)
    assert g.max_wait == 20
