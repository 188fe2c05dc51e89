"""cluster_metrics (lb_type: cluster): modes, TTFT parsing, penalties, exploration, rate limit."""

import asyncio
from collections import Counter
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.config import ConfigError, RouteConfig, policy_config
from extproc.runtime import build_config, parse_config
from extproc.core import RequestContext
from extproc.policies import PolicyEnv, registry  # noqa: F401
from extproc.core import ClusterPick
from extproc.policies.cluster_metrics import ClusterMetrics, _ReqState
from extproc.envoy.processor import Processor
from extproc.runtime import Runtime
from extproc.telemetry import Telemetry
from proc_stream import headers_msg

FIXTURE = Path("/work/shared/fixtures/vllm-0.32-chat-stream.txt")
ABC = ["a", "b", "c"]


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def make(mode="LeastTotalLatency", services=ABC, **cfg):
    raw = {"mode": mode, "service_list": list(services), **cfg}
    conf = policy_config(ClusterMetrics.Config, raw)
    p = ClusterMetrics(conf, PolicyEnv.standalone(RouteConfig(name="r", lb_policy="cluster_metrics", lb_type="cluster")))
    p._clock = Clock()
    return p


def pick(p) -> RequestContext:
    ctx = RequestContext("r", {})
    ctx.started = p._clock()
    d = asyncio.run(p.pick(ctx, ()))
    assert isinstance(d, ClusterPick) and d.header == p.config.cluster_header
    ctx.cluster = d.cluster
    return ctx


def finish(p, ctx, latency, status=200, outcome="complete", body_chunks=None):
    """Drive a request's response: status, optional body chunks at given offsets, then done."""
    ctx.status = status
    for at, chunk, eos in body_chunks or ():
        p._clock.t = ctx.started + at
        p.on_response_body(ctx, chunk, eos)
    p._clock.t = ctx.started + latency
    ctx.outcome = outcome
    p.on_done(ctx)


def seed(p, cluster, latency, n=3, status=200):
    for _ in range(n):
        ctx = RequestContext("r", {})
        ctx.started = p._clock()
        ctx.cluster = cluster
        ctx.policy_state = _ReqState(False)
        p.inflight[cluster] += 1
        finish(p, ctx, latency, status)
        p._clock.t = ctx.started  # samples at (almost) the same time


def counts(p, n):
    return Counter(pick(p).cluster for _ in range(n))


# -- config -------------------------------------------------------------------------------
def test_registered_as_cluster_policy_with_higress_defaults():
    assert "cluster_metrics" in registry.names("cluster")
    c = build_config({"routes": {"m": {"lb_type": "cluster", "lb_policy": "cluster_metrics",
                                       "lb_config": {"mode": "LeastBusy", "service_list": ["a", "b"], "rate_limit": "0.6"}}}})
    conf = policy_config(ClusterMetrics.Config, c.routes["m"].lb_config)
    assert conf.rate_limit == 0.6 and conf.queue_size == 100 and conf.cluster_header == "x-higress-target-cluster"


@pytest.mark.parametrize("cfg, where", [
    ({"mode": "Busiest", "service_list": ["a"]}, "mode"),
    ({"mode": "LeastBusy"}, "service_list"),
    ({"mode": "LeastBusy", "service_list": []}, "service_list"),
    ({"mode": "LeastBusy", "service_list": ["a", "a"]}, "service_list"),
    ({"mode": "LeastBusy", "service_list": ["a"], "rate_limit": "1.5"}, "rate_limit"),
    ({"mode": "LeastBusy", "service_list": ["a"], "rate_limit": 0}, "rate_limit"),
    ({"mode": "LeastBusy", "service_list": ["a"], "queue_size": 0}, "queue_size"),
    ({"mode": "LeastBusy", "service_list": ["a"], "cluster_header": "X-Bad"}, "cluster_header"),
])
def test_bad_config_is_rejected_with_field_path(cfg, where):
    with pytest.raises(ConfigError) as ei:
        build_config({"routes": {"m": {"lb_type": "cluster", "lb_policy": "cluster_metrics", "lb_config": cfg}}})
    assert f"routes.m.lb_config.{where}" in str(ei.value)


def test_only_ttft_mode_pays_for_response_body():
    for mode in ("LeastBusy", "LeastTotalLatency"):
        p = make(mode)
        assert p.needs_response_headers and not p.needs_response_body
    p = make("LeastFirstTokenLatency")
    assert p.needs_response_headers and p.needs_response_body


# -- modes --------------------------------------------------------------------------------
def test_least_busy_picks_fewest_in_flight_and_done_decrements():
    p = make("LeastBusy")
    ctxs = [pick(p) for _ in range(6)]
    assert p.inflight == {"a": 2, "b": 2, "c": 2}  # spread evenly
    for c in [x for x in ctxs if x.cluster == "b"]:
        finish(p, c, 1.0)
    assert p.inflight["b"] == 0
    assert pick(p).cluster == "b"
    for c in ctxs:
        finish(p, c, 1.0, outcome="reset")  # resets / repeats never go negative
    assert min(p.inflight.values()) >= 0


def test_least_total_latency_picks_lowest_mean():
    p = make()
    seed(p, "a", 3.0)
    seed(p, "b", 1.0)
    seed(p, "c", 2.0)
    assert counts(p, 20) == {"b": 20}
    seed(p, "b", 10.0, n=10)  # b got slow: mean moves over the window
    assert pick(p).cluster == "c"


def test_queue_size_bounds_the_window():
    p = make(services=["a", "b"], queue_size=2)
    seed(p, "a", 100.0, n=5)
    seed(p, "b", 2.0)
    assert pick(p).cluster == "b"
    seed(p, "a", 1.0, n=2)  # the last 2 samples are all that count
    assert p.samples["a"].mean(p._clock(), 60) == 1.0
    assert pick(p).cluster == "a"


def test_least_first_token_latency_uses_ttft_not_total():
    p = make("LeastFirstTokenLatency", services=["a", "b"])
    sse = FIXTURE.read_bytes()
    # a: first token fast, long stream; b: first token slow, short stream.
    for cl, first, total in (("a", 0.1, 5.0), ("b", 0.5, 0.6)):
        for _ in range(3):
            ctx = RequestContext("r", {})
            ctx.started = p._clock()
            ctx.cluster = cl
            ctx.policy_state = _ReqState(False)
            p.inflight[cl] += 1
            finish(p, ctx, total, body_chunks=[(first, sse, False), (total, b"", True)])
    assert p.samples["a"].mean(p._clock(), 60) == pytest.approx(0.1)
    assert p.samples["b"].mean(p._clock(), 60) == pytest.approx(0.5)
    assert counts(p, 10) == {"a": 10}


# -- TTFT parsing ---------------------------------------------------------------------------
def fixture_events():
    return [e + b"\n\n" for e in FIXTURE.read_bytes().split(b"\n\n") if e.strip()]


def test_ttft_ignores_role_and_empty_content_chunks():
    p = make("LeastFirstTokenLatency", services=["a"])
    ev = fixture_events()
    assert b'"role":"assistant","content":""' in ev[0] and b'"content":""' in ev[1]
    ctx = pick(p)
    t0 = ctx.started
    # One SSE event per body chunk, 1 s apart: events 0 and 1 carry no text; event 2 does.
    for i, e in enumerate(ev[:5]):
        p._clock.t = t0 + i
        p.on_response_body(ctx, e, False)
    assert ctx.policy_state.ttft == 2.0
    assert ctx.policy_state.first.seen  # stops looking after the first token


def test_ttft_found_when_the_field_is_split_across_chunks():
    p = make("LeastFirstTokenLatency", services=["a"])
    ev = fixture_events()
    ctx = pick(p)
    data = ev[0] + ev[1] + ev[2]
    cut = data.index(b'"content":"\xc3') + 5  # split inside the first real content field
    p._clock.t = ctx.started + 1
    p.on_response_body(ctx, data[:cut], False)
    assert ctx.policy_state.ttft is None
    p._clock.t = ctx.started + 2
    p.on_response_body(ctx, data[cut:], False)
    assert ctx.policy_state.ttft == 2


def test_ttft_of_non_streamed_answer_is_first_byte():
    p = make("LeastFirstTokenLatency", services=["a"])
    ctx = pick(p)
    p._clock.t = ctx.started + 0.7
    p.on_response_body(ctx, b'{"id":"x","choices":[{"message":{"role":"assistant","content":""}}]}', False)
    assert ctx.policy_state.ttft == pytest.approx(0.7)


def test_ttft_of_stream_without_text_is_its_duration():
    p = make("LeastFirstTokenLatency", services=["a"])
    ctx = pick(p)
    ev = fixture_events()
    p._clock.t = ctx.started + 0.1
    p.on_response_body(ctx, ev[0], False)
    p._clock.t = ctx.started + 0.9
    p.on_response_body(ctx, b"data: [DONE]\n\n", True)
    assert ctx.policy_state.ttft == pytest.approx(0.9)


# -- penalties, exploration, ageing ---------------------------------------------------------
def test_non_200_counts_as_twice_the_worst_mean():
    p = make()
    seed(p, "a", 1.0)
    seed(p, "b", 4.0)
    seed(p, "c", 2.0)
    seed(p, "a", 0.01, n=1, status=503)  # fast failure
    assert p.samples["a"].mean(p._clock(), 60) == pytest.approx((3 * 1.0 + 8.0) / 4)
    assert pick(p).cluster == "c"  # a (2.75) now loses to c (2.0)


def test_failing_unsampled_cluster_is_penalised_not_rewarded():
    p = make(services=["a", "b"])
    seed(p, "a", 1.0)
    ctx = pick(p)
    assert ctx.cluster == "b"  # exploration probe
    finish(p, ctx, 0.001, status=500)
    assert p.samples["b"].mean(p._clock(), 60) == pytest.approx(2.0)
    assert counts(p, 10) == {"a": 10}


def test_unsampled_cluster_is_explored_but_does_not_win_forever():
    p = make(services=["a", "b"], explore_picks=2)
    seed(p, "a", 1.0)
    got = [pick(p) for _ in range(10)]  # b never answers (slow or hung): only 2 probes
    assert Counter(c.cluster for c in got) == {"b": 2, "a": 8}
    assert all(c.policy_state.probe for c in got if c.cluster == "b")


def test_all_unsampled_at_start_each_gets_probes_then_ranked():
    p = make(explore_picks=1)
    first = [pick(p) for _ in range(3)]
    assert sorted(c.cluster for c in first) == ABC  # each unsampled cluster is probed once
    for c, lat in zip(sorted(first, key=lambda c: c.cluster), (3.0, 1.0, 2.0)):
        finish(p, c, lat)
    assert counts(p, 5) == {"b": 5}


def test_old_samples_age_out_and_the_cluster_is_probed_again():
    p = make(services=["a", "b"], sample_ttl=30)
    seed(p, "a", 1.0)
    seed(p, "b", 9.0)
    assert pick(p).cluster == "a"
    p._clock.t += 40  # b's bad history is forgotten (so is a's): both get probed again
    got = Counter(pick(p).cluster for _ in range(4))
    assert got == {"a": 2, "b": 2}


def test_reset_without_response_leaves_no_sample():
    p = make(services=["a"])
    ctx = pick(p)
    ctx.status = None
    ctx.outcome = "reset"
    p.on_done(ctx)
    assert p.samples["a"].mean(p._clock(), 60) is None and p.inflight["a"] == 0


# -- rate limit -----------------------------------------------------------------------------
def test_rate_limit_caps_the_share_of_the_best_cluster():
    p = make(services=["a", "b"], rate_limit="0.6")
    seed(p, "a", 1.0)
    seed(p, "b", 2.0)
    c = counts(p, 100)
    assert 55 <= c["a"] <= 61 and c["b"] >= 39


def test_rate_limit_is_a_time_window_not_a_pick_count():
    p = make("LeastBusy", services=["a", "b"], rate_limit=0.5, rate_window=10)
    # 10 picks while b is busy: all go to a, but the share limit moves some to b.
    p.inflight["b"] = 100
    c = counts(p, 10)
    assert c["b"] >= 4
    # After the window has passed, those picks no longer count: a is free again.
    p._clock.t += 11
    assert len(p.share._picks) == 10
    assert pick(p).cluster == "a" and pick(p).cluster == "a"
    assert len(p.share._picks) == 2  # old picks expired


def test_rate_limit_one_records_nothing():
    p = make("LeastBusy", services=["a", "b"])
    counts(p, 50)
    assert len(p.share._picks) == 0


# -- through the processor (fake ext_proc stream) -------------------------------------------
class Stream:
    def __init__(self, msgs):
        self.msgs, self.out = list(msgs), []

    async def read(self):
        return self.msgs.pop(0) if self.msgs else grpc.aio.EOF

    async def write(self, m):
        self.out.append(m)


def _headers_msg(route, **hdrs):
    return headers_msg(route, eos=True, **hdrs)


def _resp_headers(status):
    h = pb.HttpHeaders()
    h.headers.headers.append(base_pb2.HeaderValue(key=":status", raw_value=str(status).encode()))
    return pb.ProcessingRequest(response_headers=h)


def _resp_body(data, eos):
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=eos))


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["LeastBusy", "LeastFirstTokenLatency"])
async def test_processor_overwrites_cluster_header_and_subscribes_per_mode(mode):
    tel = Telemetry(fallback_log_interval=0)
    rt = Runtime()
    await rt.apply(parse_config(
        "routes:\n  multi: {lb_type: cluster, lb_policy: cluster_metrics, "
        f"lb_config: {{mode: {mode}, service_list: [x, y]}}}}\n"))
    proc = Processor(rt, tel, rt.load)
    pol = rt.routes["multi"].policy
    msgs = [_headers_msg("multi", **{"x-higress-target-cluster": "evil"}), _resp_headers(200)]
    if mode == "LeastFirstTokenLatency":
        msgs += [_resp_body(fixture_events()[0], False), _resp_body(fixture_events()[2], True)]
    s = Stream(msgs)
    await proc.Process(None, s)
    first = s.out[0]
    common = first.request_headers.response
    sets = {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}
    assert sets["x-higress-target-cluster"] in ("x", "y")
    assert common.clear_route_cache
    mo = first.mode_override
    assert mo.response_header_mode == mo.SEND
    assert (mo.response_body_mode == mo.STREAMED) == (mode == "LeastFirstTokenLatency")
    assert pol.inflight == {"x": 0, "y": 0}  # on_done ran
    if mode == "LeastFirstTokenLatency":
        assert sum(len(v.q) for v in pol.samples.values()) == 1
