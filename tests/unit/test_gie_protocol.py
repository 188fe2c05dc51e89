"""The GIE endpoint-picker protocol in the processor, with real protobuf messages:
FULL_DUPLEX_STREAMED bodies (every chunk back, in order, the pick in the headers answer
sent after the last chunk), the subset hint (filter; empty: 503), the fallback list and
the served endpoint Envoy reports."""

import asyncio
import json
import types

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

import plugins.model_pin  # noqa: F401,E402 - registers test_model_pin
from proc_stream import Stream  # noqa: E402

from extproc.envoy.duplex import CHUNK  # noqa: E402
from extproc.envoy.processor import Processor  # noqa: E402
from extproc.runtime import Runtime, parse_config  # noqa: E402
from extproc.telemetry import Telemetry  # noqa: E402

FULL_DUPLEX = 4  # ProcessingMode.FULL_DUPLEX_STREAMED
EPS = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80"]
CONFIG = f"""
plugins: [plugins.model_pin]
server: {{max_body_bytes: 300000}}
routes:
  llm: {{lb_policy: least_request, endpoints: {{static: {json.dumps(EPS)}}}}}
  body: {{lb_policy: test_model_pin, endpoints: {{static: {json.dumps(EPS)}}}}}
  one: {{lb_policy: round_robin, fallback_endpoints: 0, endpoints: {{static: {json.dumps(EPS)}}}}}
"""



def headers_msg(route, eos=False):
    h = pb.HttpHeaders(end_of_stream=eos)
    for k, v in {":method": "POST", ":path": "/v1/chat/completions"}.items():
        h.headers.headers.append(base_pb2.HeaderValue(key=k, raw_value=v.encode()))
    req = pb.ProcessingRequest(request_headers=h)
    req.attributes["envoy.filters.http.ext_proc"].fields["xds.route_name"].string_value = route
    return req


def dest(resp):
    common = (resp.request_headers if resp.HasField("request_headers") else resp.request_body).response
    sets = {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}
    md = resp.dynamic_metadata.fields.get("envoy.lb")
    md_val = md.struct_value.fields["x-gateway-destination-endpoint"].string_value if md else None
    return sets.get("x-gateway-destination-endpoint"), md_val, list(common.header_mutation.remove_headers)


tp = types.SimpleNamespace(Stream=Stream, headers_msg=headers_msg, dest=dest)


async def make():
    tel = Telemetry(fallback_log_interval=0)
    rt = Runtime()
    await rt.apply(parse_config(CONFIG))
    return Processor(rt, tel, rt.load, max_body_bytes=300000), rt, tel


def headers(route, eos=False, duplex=False, subset=None, resp_duplex=False):
    req = tp.headers_msg(route, eos=eos)
    if duplex:
        req.protocol_config.request_body_mode = FULL_DUPLEX
    if resp_duplex:
        req.protocol_config.response_body_mode = FULL_DUPLEX
    if subset is not None:
        s = struct_pb2.Struct()
        s.fields["x-gateway-destination-endpoint-subset"].list_value.extend(subset)
        req.metadata_context.filter_metadata["envoy.lb.subset_hint"].CopyFrom(s)
    return req


def chunks_of(body: bytes, n: int):
    return [body[i:i + n] for i in range(0, len(body), n)]


def prompt(size: int) -> bytes:
    filler = "x" * size
    return json.dumps({"model": "m1", "messages": [{"role": "user", "content": filler}]}).encode()


def echoed(out) -> tuple[bytes, list[bool]]:
    """The body the answers give back to Envoy, and their end_of_stream flags."""
    parts = [r.request_body.response.body_mutation.streamed_response for r in out if r.HasField("request_body")]
    return b"".join(p.body for p in parts), [p.end_of_stream for p in parts]


@pytest.mark.asyncio
async def test_full_duplex_body_policy_holds_headers_then_returns_every_byte():
    p, rt, tel = await make()
    body = prompt(200_000)
    msgs = [headers("body", duplex=True)] + [pb.ProcessingRequest(request_body=pb.HttpBody(body=c, end_of_stream=False))
                                             for c in chunks_of(body, 16_384)]
    msgs[-1].request_body.end_of_stream = True
    s = tp.Stream(msgs)
    await p.Process(None, s)
    first, rest = s.out[0], s.out[1:]
    assert first.HasField("request_headers") and not first.HasField("mode_override")  # Envoy's mode stays
    primary = tp.dest(first)[0].split(",")[0]
    assert primary in EPS
    got, eos = echoed(rest)
    assert got == body  # nothing dropped, nothing cut, in order
    assert eos == [False] * (len(eos) - 1) + [True] and len(rest) == -(-len(body) // CHUNK)
    assert all(len(r.request_body.response.body_mutation.streamed_response.body) <= CHUNK for r in rest)


@pytest.mark.asyncio
async def test_full_duplex_header_policy_answers_at_once_and_echoes_chunks_as_they_come():
    p, rt, tel = await make()
    body = prompt(50_000)
    parts = chunks_of(body, 20_000)
    msgs = [headers("llm", duplex=True)] + [pb.ProcessingRequest(request_body=pb.HttpBody(body=c, end_of_stream=i == len(parts) - 1))
                                            for i, c in enumerate(parts)]
    s = tp.Stream(msgs)
    await p.Process(None, s)
    assert s.out[0].HasField("request_headers") and tp.dest(s.out[0])[0]
    got, eos = echoed(s.out[1:])
    assert got == body and len(s.out) == 1 + len(parts) and eos[-1] is True


@pytest.mark.asyncio
async def test_full_duplex_over_the_cap_falls_back_and_still_returns_the_body():
    p, rt, tel = await make()
    body = prompt(400_000)  # over max_body_bytes (300 kB)
    parts = chunks_of(body, 65_536)
    msgs = [headers("body", duplex=True)] + [pb.ProcessingRequest(request_body=pb.HttpBody(body=c, end_of_stream=i == len(parts) - 1))
                                             for i, c in enumerate(parts)]
    s = tp.Stream(msgs)
    await p.Process(None, s)
    heads = [r for r in s.out if r.HasField("request_headers")]
    assert len(heads) == 1 and tp.dest(heads[0])[0] is None  # no pick: native LB
    assert echoed(s.out)[0] == body
    assert tel.fallback_count("body", "body_too_large") == 1


@pytest.mark.asyncio
async def test_full_duplex_with_trailers_and_unknown_route():
    p, rt, tel = await make()
    body = prompt(1000)
    s = tp.Stream([headers("body", duplex=True), pb.ProcessingRequest(request_body=pb.HttpBody(body=body)),
                   pb.ProcessingRequest(request_trailers=pb.HttpTrailers())])
    await p.Process(None, s)
    kinds = [r.WhichOneof("response") for r in s.out]
    assert kinds == ["request_headers", "request_body", "request_trailers"]  # headers, body, trailers order
    assert echoed(s.out) == (body, [False])  # the trailers end the body
    s = tp.Stream([headers("nowhere", duplex=True), pb.ProcessingRequest(request_body=pb.HttpBody(body=b"abc", end_of_stream=True))])
    await p.Process(None, s)
    assert [r.WhichOneof("response") for r in s.out] == ["request_headers", "request_body"]
    assert echoed(s.out) == (b"abc", [True])


@pytest.mark.asyncio
async def test_full_duplex_response_body_is_echoed():
    p, rt, tel = await make()
    s = tp.Stream([headers("llm", eos=True, resp_duplex=True),
                   pb.ProcessingRequest(response_body=pb.HttpBody(body=b"data: 1\n\n")),
                   pb.ProcessingRequest(response_body=pb.HttpBody(body=b"data: [DONE]\n\n", end_of_stream=True))])
    await p.Process(None, s)
    back = [r.response_body.response.body_mutation.streamed_response for r in s.out[1:]]
    assert [(b.body, b.end_of_stream) for b in back] == [(b"data: 1\n\n", False), (b"data: [DONE]\n\n", True)]


@pytest.mark.asyncio
async def test_subset_hint_filters_candidates_and_fallbacks():
    p, rt, tel = await make()
    for _ in range(20):
        s = tp.Stream([headers("llm", eos=True, subset=[EPS[1], EPS[3], "10.9.9.9:80"])])
        await p.Process(None, s)
        addrs = tp.dest(s.out[0])[0].split(",")
        assert set(addrs) == {EPS[1], EPS[3]}  # the primary and its fallback, both from the subset


@pytest.mark.asyncio
@pytest.mark.parametrize("subset", [[], ["10.9.9.9:80"]], ids=["empty", "none-eligible"])
async def test_subset_with_nothing_eligible_is_a_503(subset):
    p, rt, tel = await make()
    s = tp.Stream([headers("llm", eos=True, subset=subset)])
    await p.Process(None, s)
    (r,) = s.out
    assert r.immediate_response.status.code == 503


@pytest.mark.asyncio
async def test_fallbacks_are_the_least_loaded_others_and_configurable():
    p, rt, tel = await make()
    t = [rt.load.begin(EPS[0]), rt.load.begin(EPS[0]), rt.load.begin(EPS[2])]  # in flight elsewhere
    s = tp.Stream([headers("llm", eos=True)])
    await p.Process(None, s)
    header, md, _ = tp.dest(s.out[0])
    addrs = header.split(",")
    assert header == md and len(addrs) == 3 and len(set(addrs)) == 3
    assert addrs[0] in (EPS[1], EPS[3]) and EPS[0] not in addrs  # the busiest is not a fallback
    for x in t:
        rt.load.end(x)
    s = tp.Stream([headers("one", eos=True)])
    await p.Process(None, s)
    assert "," not in tp.dest(s.out[0])[0]  # fallback_endpoints: 0


class ReplyStream(tp.Stream):
    """Sends the response headers only after the pick, naming the second endpoint of the
    destination list as the one that served (what Envoy reports after a retry)."""

    def __init__(self, first, report: bool):
        super().__init__([first], hold=True)
        self.report = report
        self.sent_reply = False

    async def read(self):
        if not self.msgs and self.out and not self.sent_reply:
            self.sent_reply = True
            r = pb.ProcessingRequest(response_headers=pb.HttpHeaders())
            r.response_headers.headers.headers.add(key=":status", raw_value=b"200")
            if self.report:
                fields = r.metadata_context.filter_metadata["envoy.lb"].fields
                fields["x-gateway-destination-endpoint-served"].string_value = tp.dest(self.out[0])[0].split(",")[1]
            return r
        return await super().read()


@pytest.mark.asyncio
@pytest.mark.parametrize("report", [True, False])
async def test_served_endpoint_moves_the_in_flight_count(report):
    p, rt, tel = await make()
    s = ReplyStream(headers("llm", eos=True), report)
    task = asyncio.create_task(p.Process(None, s))
    for _ in range(200):
        if len(s.out) == 2:
            break
        await asyncio.sleep(0.005)
    picked, fallback = tp.dest(s.out[0])[0].split(",")[:2]
    counts = (rt.load.requests(picked), rt.load.requests(fallback))
    s.hold.set()
    await task
    assert counts == ((0, 1) if report else (1, 0))  # while in flight, it counts where it really is
    assert rt.load.requests(picked) == rt.load.requests(fallback) == 0
    assert tel.served.get(("llm", "fallback"), 0) == (1 if report else 0)


def test_fallbacks_stay_flat_in_fleet_size_and_least_loaded():
    """Among 1,000 candidates the fallbacks look at a bounded pool (a decision does not sort
    the fleet), never name the primary, and prefer the least loaded in the pool."""
    from extproc.core import Endpoint
    from extproc.envoy import gie

    eps = tuple(Endpoint(f"10.0.{i // 250}.{i % 250}:8000") for i in range(1000))
    asked: list[str] = []
    load = {e.address: (0 if i % 100 == 0 else 5) for i, e in enumerate(eps)}

    def requests(a: str) -> int:
        asked.append(a)
        return load[a]

    got = gie.fallbacks(eps[0], (), eps, 2, requests)
    assert len(got) == 2 and eps[0].address not in got and len(set(got)) == 2
    assert len(asked) <= gie.FALLBACK_POOL
    pool = set(asked)
    assert all(load[a] <= min(load[b] for b in pool - set(got)) for a in got)
    # Small fleets are compared whole: the two idle ones, deterministic ties by address.
    small = eps[:5] + (eps[100], eps[200])
    assert gie.fallbacks(small[0], (), small, 2, load.__getitem__) == (eps[100].address, eps[200].address)
