"""The ext_proc gRPC service: Envoy message -> request context -> policy -> answer.

One coroutine per HTTP stream. The request is decided on the request headers, or, for
policies that read the prompt, on the buffered body. Every failure path answers Envoy
with a plain pass-through (native load balancing) rather than an error, and "done"
runs exactly once however the request ends: when its stream ends if the stream is held
to the response's end (``completions: stream``), else when Envoy's access log reports
its end, or its lease runs out (``completions.py``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from ..admission.gate import HOLD_MARGIN_S, Queued, Rejected
from ..core import BodyError, ClusterPick, Endpoint, Fallback, Pick, Reject, RequestContext, Wait
from ..runtime import RouteRuntime, Runtime
from ..signals import LoadView
from ..signals.first_token import FirstToken
from ..telemetry import RateLimitedLog, Telemetry
from . import gie
from .access_log import Tagged, tag
from .answers import PM, Answers, processing_mode
from .completions import Completions, Settled
from .duplex import FULL_DUPLEX, DuplexBody, DuplexRequests, streamed

log = logging.getLogger("ai_lb.processor")

ATTR_NAMESPACE = gie.ATTR_NAMESPACE
ROUTE_ATTR = gie.ROUTE_ATTR
SUBSET_EMPTY = "no endpoint of the proxy's subset hint is eligible"
_EOF = grpc.aio.EOF
_perf = time.perf_counter


class Processor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, runtime: Runtime, telemetry: Telemetry, load: LoadView,
                 max_body_bytes: int = 8 * 1024 * 1024, completions: Completions | None = None) -> None:
        self.runtime = runtime
        self.completions = completions if completions is not None else Completions()
        self.completions.on_settled = lambda ctx, st: _settled(self, ctx, st)
        self.raw_answers = True   # the native transport writes tagged answers as bytes; grpcio needs messages
        self.telemetry, self.load, self.max_body_bytes = telemetry, load, max_body_bytes
        self.answers = Answers()
        self._errlog = RateLimitedLog(10.0)
        self.duplex = DuplexRequests(self)

    async def Process(self, request_iterator, context) -> None:  # noqa: N802 - gRPC name
        ctx: RequestContext | None = None
        rt: RouteRuntime | None = None
        duplex: DuplexBody | None = None  # set when Envoy streams the request body full duplex
        resp_duplex = False               # ... and the response body
        outcome = "complete"
        write, last = context.write, getattr(context, "write_last", None)  # write_last: the native transport's
        try:
            while True:
                req = await context.read()
                if req is _EOF:
                    break
                kind = req.WhichOneof("request")
                if kind == "request_headers":
                    pc = req.protocol_config
                    resp_duplex = pc.response_body_mode == FULL_DUPLEX
                    if pc.request_body_mode == FULL_DUPLEX and not req.request_headers.end_of_stream:
                        ctx, rt, duplex, resp = await self.duplex.headers(req, context)
                    else:
                        ctx, rt, resp = await self._on_request_headers(req, context)
                    if resp is None:
                        continue  # the headers answer waits for the whole body
                elif kind == "request_body":
                    if duplex is not None:
                        for r in await self.duplex.body(req, ctx, rt, duplex, context):
                            await write(r)
                        continue
                    resp = await self._on_request_body(req, ctx, rt, context)
                elif kind == "response_headers":
                    resp = _response_headers(self, req, ctx)
                elif kind == "response_body":
                    resp = _response_body(self, req, ctx)
                    if resp_duplex:
                        resp = streamed(req.response_body.body, req.response_body.end_of_stream, response=True)
                elif kind == "request_trailers":
                    if duplex is not None and not duplex.answered:
                        for r in await self.duplex.end(ctx, rt, duplex, context, trailers=True):
                            await write(r)
                    resp = self.answers.request_trailers
                elif kind == "response_trailers":
                    gie.note_served(req, ctx, self.load, self.telemetry)
                    resp = self.answers.response_trailers
                else:
                    break  # unknown message: stop processing; Envoy carries on without us
                if _answered_last(ctx, rt, duplex) and last is not None:
                    last(resp)  # routed, and nothing more will come: the answer and the call's end, one send
                    break
                await write(resp)
        except asyncio.CancelledError:
            outcome = "reset"
            raise
        except Exception as e:  # noqa: BLE001 - never take the request down with us
            outcome = _failed(self, ctx, rt, e)
        finally:
            if ctx is not None and ctx.policy is not None:
                _stream_ended(self, ctx, rt, outcome)

    # -- request phase -----------------------------------------------------------------
    def _route(self, req: pb.ProcessingRequest):
        """The request context and route for a headers message (ctx None: ai-lb stays out)."""
        hm = req.request_headers
        route_name, cluster = gie.request_attributes(req)
        rt = self.runtime.lookup(route_name)
        if rt is None or not rt.enabled:
            reason = "unknown_route" if rt is None else "route_disabled"
            self.telemetry.fallback(route_name, rt.policy_name if rt else "", reason)
            return None, rt
        ctx = RequestContext(route_name, header_map=hm.headers)
        ctx.held = not self.completions.off_path  # else one round trip: the access log tells the end
        ctx.cluster_name = cluster
        ctx.subset = gie.subset_hint(req)
        if rt.sample and random.random() < rt.sample:
            ctx.watch = FirstToken()  # this response is watched to its first token
        return ctx, rt

    async def _on_request_headers(self, req: pb.ProcessingRequest, stream):
        hm = req.request_headers
        ctx, rt = self._route(req)
        if ctx is None:
            return None, rt, self.answers.passthrough("headers")
        if rt.needs_body and not hm.end_of_stream:
            return ctx, rt, self.answers.passthrough("headers", _mode(rt, ctx))
        if rt.needs_body:  # bodyless request on a prompt-reading route: nothing to wait for
            self.telemetry.skip(ctx.route, "no_body")
            return ctx, rt, self.answers.passthrough("headers")
        return ctx, rt, await self._decide(ctx, rt, "headers", stream)

    async def _on_request_body(self, req: pb.ProcessingRequest, ctx: RequestContext | None,
                               rt: RouteRuntime | None, stream) -> pb.ProcessingResponse:
        if ctx is None or rt is None or ctx.policy is not None:
            return self.answers.passthrough("body")
        b = req.request_body
        body = b.body
        if len(body) > self.max_body_bytes:
            self.telemetry.fallback(ctx.route, rt.policy_name, "body_too_large", f"{len(body)} bytes")
            return self.answers.passthrough("body")
        ctx.body = body
        ctx.body_complete = b.end_of_stream
        return await self._decide(ctx, rt, "body", stream)

    async def _decide(self, ctx: RequestContext, rt: RouteRuntime, phase: str, stream,
                      duplex: bool = False) -> pb.ProcessingResponse:
        t0 = _perf()
        mode = _mode(rt, ctx) if phase == "headers" and not duplex else None  # full duplex: Envoy's own mode stays
        candidates = rt.candidates(self.runtime.directory, ctx.cluster_name)
        if ctx.subset is not None and rt.by_endpoint:
            candidates = gie.in_subset(candidates, ctx.subset)
            if not candidates:  # the GIE protocol: nothing eligible in the subset is a 503
                self.telemetry.rejected(ctx.route, rt.policy_name, 503, _perf() - t0)
                return self.answers.reject(503, SUBSET_EMPTY)
        if not candidates and rt.by_endpoint:
            self.telemetry.fallback(ctx.route, rt.policy_name, "no_healthy_endpoints")
            return self.answers.passthrough(phase, mode)
        gate, waiter, slot = rt.gate, None, None
        try:
            if gate is not None:  # the route's queue: admitted now, held until there is room, or shed
                a = await gate.admit(ctx, candidates)
                if isinstance(a, Queued):
                    waiter = a.waiter
                    await self._hold(stream, a.max_wait)
                    a = await gate.wait(a)
                if isinstance(a, Rejected):
                    self.telemetry.rejected(ctx.route, rt.policy_name, a.status, _perf() - t0)
                    return self.answers.reject(a.status, a.message, a.retry_after)
                candidates, slot = a.candidates, a.slot
            return await self._pick(ctx, rt, phase, stream, candidates, t0, mode)
        finally:
            if slot is not None:
                if ctx.endpoint is not None:
                    ctx.gate_slot = (gate, slot)  # given back when the request ends
                else:
                    gate.release(slot)            # admitted, then not routed there
            if waiter is not None:  # however it went: out of the line, and a grant it got goes on
                gate.settled(waiter)

    async def _hold(self, stream, seconds: float) -> None:
        """Keep Envoy waiting for this message (up to its ``max_message_timeout``) instead
        of timing out and falling open: a held request must never go to native LB."""
        await stream.write(pb.ProcessingResponse(override_message_timeout=_duration(seconds + HOLD_MARGIN_S)))

    async def _pick(self, ctx: RequestContext, rt: RouteRuntime, phase: str, stream, candidates,
                    t0: float, mode: PM | None) -> pb.ProcessingResponse:
        policy = rt.policy
        try:
            d = await policy.pick(ctx, candidates)
            if isinstance(d, Wait):  # a policy that holds the request itself
                await self._hold(stream, d.max_wait)
                d = await d.ready
        except BodyError as e:
            d = Fallback(e.reason)
            detail = str(e)
        except Exception as e:  # noqa: BLE001
            self._errlog.warn(("policy", rt.policy_name), "policy %s failed on route %s: %r", rt.policy_name, ctx.route, e)
            d = Fallback("policy_error")
            detail = type(e).__name__
        else:
            detail = ""
        named: tuple = ()
        if isinstance(d, Pick):
            also, named = d.also, d.fallbacks
            d = d.endpoint
        else:
            also = ()
        if isinstance(d, Endpoint) and ctx.subset is not None and d.address not in ctx.subset:
            d = Fallback("policy_error")  # a policy that ignores its candidates must not leave the subset
            detail = "picked an endpoint outside the subset hint"
        if isinstance(d, Endpoint):
            ctx.endpoint = d
            ctx.policy = policy
            self.runtime.acquire(policy)
            begin, tokens = self.load.begin, ctx.prompt_tokens
            ctx.tickets = (begin(d.address, tokens), *(begin(e.address, tokens) for _, e in also))
            self.telemetry.picked(ctx.route, rt.policy_name, d.address, _perf() - t0)
            return _tagged(self, ctx, self.answers.pick(phase, gie.destination(d, named, candidates, rt.fallbacks,
                                                                               ctx.subset, self.load.requests), mode, also))
        if isinstance(d, ClusterPick):
            ctx.cluster = d.cluster
            ctx.policy = policy
            self.runtime.acquire(policy)
            self.telemetry.picked(ctx.route, rt.policy_name, d.cluster, _perf() - t0)
            return _tagged(self, ctx, self.answers.to_cluster(phase, d.header, d.cluster, mode))
        if isinstance(d, Reject):
            self.telemetry.rejected(ctx.route, rt.policy_name, d.status, _perf() - t0)
            return self.answers.reject(d.status, d.message)
        self.telemetry.fallback(ctx.route, rt.policy_name, d.reason, detail)
        return self.answers.passthrough(phase, mode)

# -- completions off the request path -------------------------------------------------
def _tagged(self: Processor, ctx: RequestContext, resp: pb.ProcessingResponse):
    """The answer with the request's completion id in its dynamic metadata (Envoy's
    access log brings it back at the response's end)."""
    c = self.completions
    if c.mode == "stream":
        return resp
    raw = tag(self.answers.serialized(resp), c.park(ctx))
    return Tagged(raw) if self.raw_answers else pb.ProcessingResponse.FromString(raw)

def _settled(self: Processor, ctx: RequestContext, s: Settled | None) -> None:
    """The access log's report of a parked request's end (None: its lease ran out)."""
    if s is None:
        ctx.outcome = "expired"
    else:
        ctx.outcome = s.outcome
        if s.status is not None:
            ctx.status = s.status
        if s.served is not None:
            gie.apply_served(s.served, ctx, self.load, self.telemetry)
        if s.first_byte is not None and ctx.first_byte_at is None:
            ctx.first_byte_at = ctx.started + s.first_byte
    _done(self, ctx)


# -- response phase --------------------------------------------------------------------
def _response_headers(self: Processor, req: pb.ProcessingRequest, ctx: RequestContext | None) -> pb.ProcessingResponse:
    """Response headers: the served endpoint, the status, the policy's hook."""
    gie.note_served(req, ctx, self.load, self.telemetry)
    if ctx is not None and ctx.policy is not None:
        for h in req.response_headers.headers.headers:
            if h.key == ":status":
                try:
                    ctx.status = int(h.raw_value or h.value)
                except ValueError:
                    pass
                break
        try:
            ctx.policy.on_response_headers(ctx, ctx.status or 0)
        except Exception as e:  # noqa: BLE001
            self._errlog.warn(("hook", "response_headers"), "on_response_headers failed: %r", e)
    return self.answers.response_headers


def _response_body(self: Processor, req: pb.ProcessingRequest, ctx: RequestContext | None) -> pb.ProcessingResponse:
    """A response body chunk: first byte, first token, end, the policy's hook."""
    if ctx is not None and ctx.policy is not None:
        b = req.response_body
        if ctx.first_byte_at is None and b.body:
            ctx.first_byte_at = time.monotonic()
        if b.end_of_stream:
            ctx.response_complete = True
        try:
            if ctx.watch is not None and ctx.watch.feed(b.body, b.end_of_stream):
                ctx.policy.on_first_token(ctx, time.monotonic() - ctx.started)
            ctx.policy.on_response_body(ctx, b.body, b.end_of_stream)
        except Exception as e:  # noqa: BLE001
            self._errlog.warn(("hook", "response_body"), "on_response_body failed: %r", e)
    return self.answers.response_body


def _failed(p: Processor, ctx: RequestContext | None, rt: RouteRuntime | None, e: Exception) -> str:
    """The stream failed on our side: logged, and when the request was not routed yet
    (Envoy then sends it on with its own LB) counted as a fallback, ``processor_error``."""
    if ctx is None or (ctx.endpoint is None and ctx.cluster is None):
        p.telemetry.fallback(ctx.route if ctx else "", rt.policy_name if rt else "", "processor_error",
                             f"ext_proc stream failed: {e!r}")
    else:
        p._errlog.warn(("processor", type(e).__name__), "ext_proc stream failed: %r", e)
    return "error"


def _answered_last(ctx: RequestContext | None, rt: RouteRuntime | None, duplex: DuplexBody | None) -> bool:
    """The request is routed, its end is left to the access log and the mode ai-lb set
    asks for nothing later: no further message will come on this stream."""
    return (ctx is not None and ctx.completion is not None and not ctx.held and rt is not None and rt.one_trip
            and duplex is None and ctx.watch is None)


def _stream_ended(p: Processor, ctx: RequestContext, rt: RouteRuntime | None, stream_end: str) -> None:
    """A routed request's ext_proc stream ended: its "done", unless the access log tells it."""
    if ctx.completion is not None and not (ctx.held or stream_end == "error"):
        return  # answered and left to the access log (or the lease): Envoy's stream end says nothing
    if ctx.completion is None or p.completions.unpark(ctx):
        ctx.outcome = _outcome(ctx, rt, stream_end)
        _done(p, ctx)


def _done(p: Processor, ctx: RequestContext) -> None:
    """Exactly once per routed request: release its queue slot and load tickets, count it,
    run on_done."""
    if ctx.gate_slot is not None:
        gate, slot = ctx.gate_slot
        ctx.gate_slot = None
        gate.release(slot)
    if ctx.tickets:
        # Upstream status when seen; a stream that ended without one says nothing about
        # the endpoint (client abort, our own error). Only the destination answered.
        end = p.load.end
        end(ctx.tickets[0], ctx.status)
        for t in ctx.tickets[1:]:
            end(t)
    p.telemetry.done(ctx.route, ctx.outcome)
    try:
        ctx.policy.on_done(ctx)
    except Exception as e:  # noqa: BLE001
        p._errlog.warn(("hook", "done"), "on_done failed: %r", e)
    finally:
        p.runtime.release(ctx.policy)


def _duration(seconds: float):
    from google.protobuf import duration_pb2

    return duration_pb2.Duration(seconds=int(seconds), nanos=int((seconds % 1) * 1e9))


def _mode(rt: RouteRuntime, ctx: RequestContext | None = None) -> PM | None:
    """The processing mode the route's policy needs from Envoy (interned per combination);
    a watched response (first-token sampling) also streams its body to us. A request left
    to the access log is not held: its stream ends with ai-lb's answer, unless the policy
    itself reads the response."""
    if rt.needs is None:
        return None
    needs = rt.needs if ctx is None or ctx.held else rt.needs_unheld
    if ctx is not None and ctx.watch is not None:  # the response body too; the rest as needed
        return processing_mode(needs[0], needs[1], True, *needs[3:])
    return processing_mode(*needs)


def _outcome(ctx: RequestContext, rt: RouteRuntime | None, stream_end: str) -> str:
    """How the request ended, as precisely as the messages we subscribed to allow.

    Envoy half-closes the ext_proc stream at the end of every HTTP stream, client aborts
    included, so the stream alone cannot tell success from an abort; the response status
    (if the policy asked for response headers) and the response's end of stream (if it
    asked for the body) can.
    """
    if stream_end == "error":
        return "error"
    mode = _mode(rt) if rt is not None else None
    if ctx.status is not None and ctx.status >= 500:
        return "error"
    if mode is not None and mode.response_body_mode != mode.NONE and not ctx.response_complete:
        return "reset"
    if ctx.status is not None:
        return "complete"
    if mode is not None and mode.response_header_mode == mode.SEND:
        return "reset"  # subscribed to the response, but none came
    return "unobserved"
