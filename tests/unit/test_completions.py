"""Completions learned off the request path: the id in the answer, Envoy's access log
entries, exactly-once "done", leases, auto mode and forwarding between workers."""

import asyncio

import pytest
from envoy.config.core.v3 import address_pb2
from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.envoy.access_log import AccessLogSink, settled, tag
from extproc.envoy.answers import DEST_HEADER, DEST_METADATA_NS, PM
from extproc.envoy.completions import Completions, Settled
from extproc.envoy.forwarding import Forwarder, WorkerLink, socket_pairs
from extproc.envoy.processor import Processor
from extproc.policies import Policy, registry
from extproc.runtime import Runtime, parse_config
from extproc.telemetry import Telemetry
from proc_stream import Stream, headers_msg


class DoneSpy(Policy):
    name = "test_done_spy"

    def __init__(self, config, env):
        super().__init__(config, env)
        self.done = []

    async def pick(self, ctx, candidates):
        return candidates[0]

    def on_done(self, ctx):
        self.done.append((ctx.outcome, ctx.status, ctx.served))


registry.register(DoneSpy)
CONFIG = """
routes:
  llm: {lb_policy: test_done_spy, fallback_endpoints: 1, endpoints: {static: ["10.0.0.1:80", "10.0.0.2:80"]}}
"""


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


async def make(mode="access_log", lease=600.0, clock=None):
    tel = Telemetry(fallback_log_interval=0)
    rt = Runtime()
    await rt.apply(parse_config(CONFIG))
    c = Completions(mode, lease, clock=clock or Clock())
    p = Processor(rt, tel, rt.load, completions=c)
    return p, rt, tel, c, rt.routes["llm"].policy


def entry(cid, code=200, upstream="10.0.0.1:80", dc=False, uf=False, first_ms=None):
    e = al.HTTPAccessLogEntry()
    cp = e.common_properties
    if cid is not None:
        cp.metadata.filter_metadata["ai_lb"].fields["id"].string_value = cid
    if code:
        e.response.response_code.value = code
    if upstream:
        host, port = upstream.rsplit(":", 1)
        cp.upstream_remote_address.CopyFrom(address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=host, port_value=int(port))))
    cp.response_flags.downstream_connection_termination = dc
    cp.response_flags.upstream_connection_failure = uf
    if first_ms is not None:
        cp.time_to_first_upstream_rx_byte.FromMilliseconds(first_ms)
    return e


def batch(*entries):
    m = als_pb2.StreamAccessLogsMessage()
    m.http_logs.log_entry.extend(entries)
    return m


def test_tag_adds_the_id_beside_the_destination_metadata():
    r = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
    r.dynamic_metadata.fields[DEST_METADATA_NS].struct_value.fields[DEST_HEADER].string_value = "10.0.0.1:80"
    cid = "ab12cd34.3.7f." + "9" * 140   # long enough for multi-byte lengths
    got = pb.ProcessingResponse.FromString(tag(r.SerializeToString(), cid))
    md = got.dynamic_metadata.fields
    assert md[DEST_METADATA_NS].struct_value.fields[DEST_HEADER].string_value == "10.0.0.1:80"
    assert md["ai_lb"].struct_value.fields["id"].string_value == cid
    assert got.HasField("request_headers")


def test_settled_reads_status_host_first_byte_and_who_failed():
    cid, s = settled(entry("x.0.1.1", 503, "10.0.0.2:80", first_ms=12))
    assert (cid, s.status, s.served, s.outcome) == ("x.0.1.1", 503, "10.0.0.2:80", "error")
    assert abs(s.first_byte - 0.012) < 1e-9
    assert settled(entry("x.0.1.1", 0, "", dc=True))[1].status is None      # the client left: not the endpoint's fault
    assert settled(entry("x.0.1.1", 503, uf=True))[1].outcome == "error"
    assert settled(entry("x.0.1.1", 0, uf=True))[1].status == 0              # connection failure counts against it
    assert settled(entry("x", 200, "::1:80"))[1].served == "[::1]:80"
    assert settled(entry(None)) is None                                      # not a request ai-lb tagged


@pytest.mark.asyncio
async def test_one_round_trip_and_done_exactly_once_from_the_access_log():
    p, rt, tel, c, pol = await make()
    s = Stream([headers_msg(eos=True)])
    await p.Process(None, s)
    (resp,) = s.out
    mode = resp.mode_override
    assert mode.response_trailer_mode == PM.SKIP and mode.response_header_mode == PM.SKIP  # nothing holds the stream
    cid = resp.dynamic_metadata.fields["ai_lb"].struct_value.fields["id"].string_value
    assert rt.load.requests("10.0.0.1:80") == 1 and pol.done == []   # the stream ended, the request did not
    sink = AccessLogSink(c)
    # a retry went to the fallback, which failed: the in-flight count and the error land there
    sink.handle(batch(entry(cid, 503, "10.0.0.2:80")))
    assert pol.done == [("error", 503, "10.0.0.2:80")]
    assert rt.load.requests("10.0.0.1:80") == rt.load.requests("10.0.0.2:80") == 0
    assert rt.load.get("10.0.0.2:80").consecutive_errors == 1 and rt.load.get("10.0.0.1:80").consecutive_errors == 0
    sink.handle(batch(entry(cid, 200), entry(None)))                 # a duplicate, and an untagged entry
    assert len(pol.done) == 1 and c.stats["unmatched"] == 1 and sink.untagged == 1
    assert tel.done_count("llm", "error") == 1


@pytest.mark.asyncio
async def test_a_lost_completion_expires_with_its_lease():
    clock = Clock()
    p, rt, tel, c, pol = await make(lease=30.0, clock=clock)
    await p.Process(None, Stream([headers_msg(eos=True)]))
    clock.t += 29
    assert c.expire() == 0 and rt.load.requests("10.0.0.1:80") == 1
    clock.t += 2
    assert c.expire() == 1
    assert rt.load.requests("10.0.0.1:80") == 0 and pol.done == [("expired", None, None)]
    assert c.stats["expired"] == 1 and len(c) == 0


@pytest.mark.asyncio
async def test_stream_mode_holds_the_stream_and_ends_on_it():
    p, rt, tel, c, pol = await make(mode="stream")
    s = Stream([headers_msg(eos=True)], hold=True)
    task = asyncio.create_task(p.Process(None, s))
    await asyncio.sleep(0.01)
    (resp,) = s.out
    assert resp.mode_override.response_trailer_mode == PM.SEND
    assert not resp.dynamic_metadata.fields.get("ai_lb")           # no id: nothing will report it
    assert rt.load.requests("10.0.0.1:80") == 1
    s.hold.set()
    await task
    assert rt.load.requests("10.0.0.1:80") == 0 and len(pol.done) == 1


@pytest.mark.asyncio
async def test_auto_holds_until_the_access_log_is_seen_and_never_ends_twice():
    clock = Clock()
    p, rt, tel, c, pol = await make(mode="auto", clock=clock)
    s = Stream([headers_msg(eos=True)], hold=True)
    task = asyncio.create_task(p.Process(None, s))
    await asyncio.sleep(0.01)
    (resp,) = s.out
    assert resp.mode_override.response_trailer_mode == PM.SEND     # no access log yet: held
    cid = resp.dynamic_metadata.fields["ai_lb"].struct_value.fields["id"].string_value
    AccessLogSink(c).handle(batch(entry(cid, 200)))                 # it arrives before the stream's end
    assert len(pol.done) == 1
    s.hold.set()
    await task
    assert len(pol.done) == 1 and rt.load.requests("10.0.0.1:80") == 0
    assert c.off_path                                                # the access log is wired: next ones not held
    s2 = Stream([headers_msg(eos=True)])
    await p.Process(None, s2)
    assert s2.out[0].mode_override.response_trailer_mode == PM.SKIP
    clock.t += 120
    assert not c.off_path                                            # nothing heard for long: hold again
    c.settle(c.prefix + "1", Settled(200, None, None, "complete"))
    assert c.off_path
    c.settle("0th3r.0.1.1", Settled(200, None, None, "complete"))    # another ai-lb behind the same Envoy
    assert not c.off_path                                            # its entries may land here: hold


@pytest.mark.asyncio
async def test_an_error_before_the_answer_ends_the_request_at_once():
    p, rt, tel, c, pol = await make()

    class Broken(Stream):
        async def write(self, m):
            raise RuntimeError("transport gone")

    await p.Process(None, Broken([headers_msg(eos=True)]))
    assert rt.load.requests("10.0.0.1:80") == 0 and pol.done[0][0] == "error" and len(c) == 0


@pytest.mark.asyncio
async def test_a_worker_forwards_an_entry_to_the_worker_that_routed_it():
    ins, outs = socket_pairs(2)
    cs = [Completions("access_log", 600, worker=i, nonce="n0nce") for i in range(2)]
    got = []
    cs[0].on_settled = lambda ctx, s: got.append((ctx, s.status))
    fw = [Forwarder(cs[i], WorkerLink(i, 2, None, ins, outs, "n0nce")) for i in range(2)]
    assert [c.forward for c in cs] == [f.send for f in fw]    # a Forwarder installs itself
    for i in range(2):
        fw[i].start()

    class Ctx:
        completion = None

    ctx = Ctx()
    cid = cs[0].park(ctx)
    cs[1].settle(cid, Settled(200, "10.0.0.1:80", 0.01, "complete"))   # worker 1 got worker 0's entry
    assert cs[1].stats["forwarded"] == 1
    for _ in range(50):
        if got:
            break
        await asyncio.sleep(0.01)
    assert got == [(ctx, 200)] and len(cs[0]) == 0
    cs[1].settle("other.0.1.1", Settled(200, None, None, "complete"))  # another instance's id
    cs[0].settle(cs[0].prefix.replace(cs[0].prefix.split(".")[2], "dead") + "1", Settled(200, None, None, "x"))
    assert cs[1].stats["foreign"] == 1 and cs[0].stats["foreign"] == 1  # a replaced worker's id: not looped back
    for f in fw:
        f.close()
    for sock in ins + outs:
        sock.close()
