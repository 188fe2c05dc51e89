"""The ext_proc handler in-process: answers, fallbacks and the exactly-once "done" hook.

These drive ``Processor.Process`` with real protobuf messages through a stand-in for the
gRPC stream; the same paths run through a real Envoy in tests/e2e.
"""

import asyncio
import json

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

import plugins.model_pin  # noqa: F401 - registers test_model_pin
from proc_stream import Stream, headers_msg
from extproc.runtime import parse_config
from extproc.envoy.answers import DEST_HEADER, DEST_METADATA_NS, PM, PREFILL_HEADER
from extproc.policies import Policy, registry
from extproc.envoy.processor import Processor
from extproc.runtime import Runtime
from extproc.telemetry import Telemetry


def body_msg(body: bytes, eos=True):
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=eos))


def resp_headers_msg(status=200):
    h = pb.HttpHeaders()
    h.headers.headers.append(base_pb2.HeaderValue(key=":status", raw_value=str(status).encode()))
    return pb.ProcessingRequest(response_headers=h)


class Recorder(Policy):
    name = "test_recorder"
    needs_response_headers = True

    def __init__(self, config, env):
        super().__init__(config, env)
        self.done = []
        self.statuses = []

    async def pick(self, ctx, candidates):
        return candidates[0]

    def on_response_headers(self, ctx, status):
        self.statuses.append(status)

    def on_done(self, ctx):
        self.done.append(ctx.outcome)


registry.register(Recorder)

CONFIG = """
plugins: [plugins.model_pin]
routes:
  llm: {lb_policy: %s, fallback_endpoints: 0, endpoints: {static: ["10.0.0.1:80", "10.0.0.2:80"]}}
  body: {lb_policy: test_model_pin, fallback_endpoints: 0, endpoints: {static: ["10.0.0.1:80", "10.0.0.2:80"]}}
  empty: {lb_policy: round_robin, endpoints: {cluster: nothing}}
  "off": {lb_policy: round_robin, enabled: false}
server: {envoy_admin: "http://127.0.0.1:1"}
"""


async def make(policy="round_robin"):
    tel = Telemetry(fallback_log_interval=0)
    rt = Runtime()
    infl = rt.load.inflight
    infl.on_change = tel.set_inflight
    await rt.apply(parse_config(CONFIG % policy))
    return Processor(rt, tel, rt.load), rt, infl, tel


def dest(resp):
    common = (resp.request_headers if resp.HasField("request_headers") else resp.request_body).response
    sets = {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}
    md = resp.dynamic_metadata.fields.get(DEST_METADATA_NS)
    md_val = md.struct_value.fields[DEST_HEADER].string_value if md else None
    return sets.get(DEST_HEADER), md_val, list(common.header_mutation.remove_headers)


def fallbacks(tel, route, reason):
    return tel.fallback_count(route, reason)


@pytest.mark.asyncio
async def test_pick_sets_header_and_metadata_and_done_runs_once():
    p, rt, infl, tel = await make()
    s = Stream([headers_msg(eos=True, **{DEST_HEADER: "6.6.6.6:1"})])
    await p.Process(None, s)
    (resp,) = s.out
    header, md, removed = dest(resp)
    assert header == md == "10.0.0.1:80"  # the client's 6.6.6.6 is overwritten, never used
    assert infl.snapshot() == {}  # inc on pick, dec on done
    assert tel.done_count("llm", "unobserved") == 1


@pytest.mark.asyncio
async def test_inflight_held_until_stream_ends():
    p, rt, infl, tel = await make()
    s = Stream([headers_msg(eos=True)], hold=True)
    task = asyncio.create_task(p.Process(None, s))
    await asyncio.sleep(0.01)
    assert infl.snapshot() == {"10.0.0.1:80": 1}
    s.hold.set()
    await task
    assert infl.snapshot() == {}


@pytest.mark.asyncio
async def test_done_exactly_once_on_complete_error_and_reset():
    p, rt, infl, tel = await make("test_recorder")
    pol = rt.routes["llm"].policy
    await p.Process(None, Stream([headers_msg(eos=True), resp_headers_msg(200)]))
    await p.Process(None, Stream([headers_msg(eos=True), resp_headers_msg(503)]))
    s = Stream([headers_msg(eos=True)], hold=True)  # client aborts before any response
    task = asyncio.create_task(p.Process(None, s))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pol.done == ["complete", "error", "reset"]
    assert pol.statuses == [200, 503]
    assert infl.snapshot() == {}


@pytest.mark.asyncio
async def test_policy_needing_response_headers_gets_mode_override():
    p, rt, infl, tel = await make("test_recorder")
    s = Stream([headers_msg(eos=True)])
    await p.Process(None, s)
    assert s.out[0].mode_override.response_header_mode == s.out[0].mode_override.SEND


@pytest.mark.asyncio
async def test_body_route_asks_for_body_then_picks_by_model():
    p, rt, infl, tel = await make()
    s = Stream([headers_msg("body"), body_msg(json.dumps({"model": "m1", "messages": []}).encode())])
    await p.Process(None, s)
    first, second = s.out
    assert first.mode_override.request_body_mode == first.mode_override.BUFFERED_PARTIAL
    assert dest(first) == (None, None, [DEST_HEADER, PREFILL_HEADER])  # spoofed header stripped while we wait
    assert dest(second)[0] in ("10.0.0.1:80", "10.0.0.2:80")


@pytest.mark.asyncio
@pytest.mark.parametrize("body,eos,reason", [
    (b"{not json", True, "malformed_json"),
    (b"\x00\xff\xfe binary", True, "malformed_json"),
    (b"[1, 2]", True, "malformed_json"),
    (b'{"model": "m", "messages": [', False, "body_truncated"),
])
async def test_unusable_body_falls_back_with_reason(body, eos, reason):
    p, rt, infl, tel = await make()
    s = Stream([headers_msg("body"), body_msg(body, eos)])
    await p.Process(None, s)
    assert dest(s.out[1]) == (None, None, [DEST_HEADER, PREFILL_HEADER])
    assert fallbacks(tel, "body", reason) == 1
    assert infl.snapshot() == {}


DEEP = b'{"model": "m", "messages": ' + b"[" * 20000 + b"]" * 20000 + b"}"
DEEP_CONTENT = (b'{"model": "m", "messages": [{"role": "user", "content": ' + b"[" * 900 + b"]" * 900 + b"}]}")


@pytest.mark.asyncio
@pytest.mark.parametrize("body", [
    DEEP,                     # RecursionError in json.loads: was counted as policy_error
    DEEP_CONTENT,             # parses, but code walking it recursively (json.dumps) would overflow
    b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}',  # a lone surrogate
    b'{"model": "m", "max_tokens": NaN, "messages": []}',
    b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
])
async def test_deep_or_invalid_json_is_malformed_json_not_policy_error(body):
    p, rt, infl, tel = await make("prefix_cache")
    s = Stream([headers_msg("llm"), body_msg(body)])
    await p.Process(None, s)
    assert dest(s.out[1]) == (None, None, [DEST_HEADER, PREFILL_HEADER])
    assert fallbacks(tel, "llm", "malformed_json") == 1, tel.fallbacks
    assert fallbacks(tel, "llm", "policy_error") == 0
    assert infl.snapshot() == {}


@pytest.mark.asyncio
async def test_bodyless_request_on_body_route_passes_at_once():
    p, rt, infl, tel = await make()
    s = Stream([headers_msg("body", eos=True, **{":method": "GET", ":path": "/v1/models"})])
    await p.Process(None, s)
    (resp,) = s.out
    assert not resp.HasField("mode_override")  # no body requested: nothing to wait for
    assert fallbacks(tel, "body", "no_body") == 0  # expected traffic, not alert noise
    assert tel.fallbacks == {}
    assert tel.skipped_count("body", "no_body") == 1


@pytest.mark.asyncio
async def test_body_over_limit_falls_back():
    p, rt, infl, tel = await make()
    p.max_body_bytes = 10
    s = Stream([headers_msg("body"), body_msg(b'{"model": "m1", "x": 1}')])
    await p.Process(None, s)
    assert fallbacks(tel, "body", "body_too_large") == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("route,reason", [("nope", "unknown_route"), ("off", "route_disabled"), ("empty", "no_healthy_endpoints")])
async def test_route_level_fallbacks(route, reason):
    p, rt, infl, tel = await make()
    s = Stream([headers_msg(route, eos=True)])
    await p.Process(None, s)
    assert dest(s.out[0]) == (None, None, [DEST_HEADER, PREFILL_HEADER])
    assert fallbacks(tel, route, reason) == 1


class Broken(Policy):
    name = "test_broken"

    async def pick(self, ctx, candidates):
        raise RuntimeError("boom")


registry.register(Broken)


@pytest.mark.asyncio
async def test_policy_exception_falls_back_not_fails():
    p, rt, infl, tel = await make("test_broken")
    s = Stream([headers_msg(eos=True)])
    await p.Process(None, s)
    assert dest(s.out[0]) == (None, None, [DEST_HEADER, PREFILL_HEADER])
    assert fallbacks(tel, "llm", "policy_error") == 1


@pytest.mark.asyncio
async def test_reload_keeps_policy_state_when_route_unchanged_and_replaces_otherwise():
    p, rt, infl, tel = await make()
    before = rt.routes["llm"].policy
    await rt.apply(parse_config(CONFIG % "round_robin"))
    assert rt.routes["llm"].policy is before
    await rt.apply(parse_config(CONFIG % "least_request"))
    assert rt.routes["llm"].policy is not before
    assert rt.routes["llm"].policy.name == "least_request"


class BodyRecorder(Recorder):
    name = "test_body_recorder"
    needs_response_body = True


registry.register(BodyRecorder)


def resp_body_msg(data=b"data: x\n\n", eos=False):
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=eos))


@pytest.mark.asyncio
async def test_response_body_subscription_tells_complete_from_aborted():
    p, rt, infl, tel = await make("test_body_recorder")
    pol = rt.routes["llm"].policy
    await p.Process(None, Stream([headers_msg(eos=True), resp_headers_msg(200), resp_body_msg(), resp_body_msg(eos=True)]))
    # The client went away mid-stream: Envoy half-closes without the body's end.
    await p.Process(None, Stream([headers_msg(eos=True), resp_headers_msg(200), resp_body_msg()]))
    assert pol.done == ["complete", "reset"]


@pytest.mark.asyncio
@pytest.mark.parametrize("policy", ["round_robin", "test_recorder", "test_model_pin"])
async def test_routed_requests_keep_the_stream_open_until_the_response_ends(policy):
    """Envoy closes the ext_proc stream once it expects nothing more; subscribing to
    response trailers is what keeps "done" at the real end of the response."""
    p, rt, infl, tel = await make(policy)
    route = "body" if policy == "test_model_pin" else "llm"
    s = Stream([headers_msg(route)])
    await p.Process(None, s)
    assert s.out[0].mode_override.response_trailer_mode == s.out[0].mode_override.SEND


class Watched(Recorder):
    name = "test_watched"
    first_token_sample = 1.0   # every response watched to its first token


registry.register(Watched)


@pytest.mark.asyncio
async def test_a_watched_response_on_a_held_stream_is_routed():
    """First-token sampling while the stream is held (completions: stream, or auto before
    Envoy's access log is seen): the mode asks for the response body too. It used to raise
    IndexError (the held needs have no fifth field), the stream failed, and Envoy sent
    the request on unrouted, uncounted (estimated_ttft's e2e test caught it)."""
    p, rt, infl, tel = await make("test_watched")
    s = Stream([headers_msg(eos=True)], hold=True)
    task = asyncio.ensure_future(p.Process(None, s))
    await asyncio.sleep(0.01)
    (resp,) = s.out
    assert dest(resp)[0] == "10.0.0.1:80"
    mode = resp.mode_override
    assert mode.response_body_mode == PM.STREAMED and mode.response_trailer_mode == PM.SEND
    s.hold.set()
    await task
    assert tel.decisions[("llm", "test_watched", "10.0.0.1:80", "picked")] == 1
    assert len(rt.routes["llm"].policy.done) == 1 and infl.snapshot() == {}   # done once


@pytest.mark.asyncio
async def test_a_stream_that_fails_before_routing_is_a_counted_fallback():
    p, rt, infl, tel = await make()

    class Failing(Stream):
        async def read(self):
            raise RuntimeError("boom")

    await p.Process(None, Failing([]))
    assert fallbacks(tel, "", "processor_error") == 1
