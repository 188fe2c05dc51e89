"""FULL_DUPLEX_STREAMED bodies: Envoy streams the body to ai-lb chunk by chunk without
waiting, and forwards upstream only what ai-lb sends back (``streamed_response`` body
mutations). So every chunk must come back, in order, exactly once: a chunk ai-lb holds
and never returns is a prompt cut short.

``DuplexBody`` is the request side of one stream. A policy that reads the prompt makes
ai-lb hold the headers answer: chunks are buffered (up to ``max_body_bytes``) and, at the
end of the body, the pick goes out in the headers answer, followed by the whole body
again in pieces of at most ``CHUNK`` bytes (Envoy's advice: 64 KiB). Past the cap, or for
policies that decide on headers, chunks are returned as they come.
"""

from __future__ import annotations

from typing import Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from .answers import PM

FULL_DUPLEX = PM.FULL_DUPLEX_STREAMED

CHUNK = 62_000  # under Envoy's 64 KiB recommendation, with room for framing


def streamed(chunk: bytes, end_of_stream: bool, response: bool = False) -> pb.ProcessingResponse:
    body = pb.BodyResponse(response=pb.CommonResponse(body_mutation=pb.BodyMutation(
        streamed_response=pb.StreamedBodyResponse(body=chunk, end_of_stream=end_of_stream))))
    return pb.ProcessingResponse(response_body=body) if response else pb.ProcessingResponse(request_body=body)


class DuplexBody:
    """One request's body in FULL_DUPLEX_STREAMED mode."""

    __slots__ = ("held", "chunks", "size", "max_bytes", "ended", "answered")

    def __init__(self, max_bytes: int, held: bool) -> None:
        self.held = held          # the headers answer waits for the whole body
        self.chunks: list[bytes] = []
        self.size = 0
        self.max_bytes = max_bytes
        self.ended = False        # saw the body's end (end_of_stream, or trailers)
        self.answered = not held  # the headers answer went out

    def add(self, chunk: bytes, end_of_stream: bool) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)
        self.ended = self.ended or end_of_stream

    @property
    def over_limit(self) -> bool:
        return self.size > self.max_bytes

    def body(self) -> bytes:
        return b"".join(self.chunks)

    def release(self, end_of_stream: bool) -> list[pb.ProcessingResponse]:
        """Everything held, as streamed body answers; the last carries ``end_of_stream``."""
        data, self.chunks, self.size = b"".join(self.chunks), [], 0
        self.answered = True
        if not data:
            return [streamed(b"", end_of_stream)]
        out = [streamed(data[i:i + CHUNK], False) for i in range(0, len(data), CHUNK)]
        if end_of_stream:
            out[-1] = streamed(data[(len(out) - 1) * CHUNK:], True)
        return out


class DuplexRequests:
    """The request phase of full-duplex streams, for a ``Processor`` (its route lookup,
    decisions, answers and telemetry)."""

    def __init__(self, processor: Any) -> None:
        self.p = processor

    async def headers(self, req: pb.ProcessingRequest, stream: Any) -> tuple:
        """(ctx, route, DuplexBody, answer or None): decide now, or hold for the body."""
        p = self.p
        ctx, rt = p._route(req)
        if ctx is None:
            return None, rt, DuplexBody(p.max_body_bytes, held=False), p.answers.passthrough("headers")
        if rt.needs_body:
            return ctx, rt, DuplexBody(p.max_body_bytes, held=True), None
        return ctx, rt, DuplexBody(p.max_body_bytes, held=False), await p._decide(ctx, rt, "headers", stream,
                                                                                   duplex=True)

    async def body(self, req: pb.ProcessingRequest, ctx: Any, rt: Any, duplex: DuplexBody,
                   stream: Any) -> list[pb.ProcessingResponse]:
        b = req.request_body
        if duplex.answered:  # decided already: every chunk goes straight back
            return [streamed(b.body, b.end_of_stream)]
        duplex.add(b.body, b.end_of_stream)
        if duplex.over_limit:  # too big to parse: native LB, and the body flows on untouched
            p = self.p
            p.telemetry.fallback(ctx.route, rt.policy_name, "body_too_large", f"over {p.max_body_bytes} bytes")
            return [p.answers.passthrough("headers"), *duplex.release(b.end_of_stream)]
        if b.end_of_stream:
            return await self.end(ctx, rt, duplex, stream)
        return []

    async def end(self, ctx: Any, rt: Any, duplex: DuplexBody, stream: Any,
                  trailers: bool = False) -> list[pb.ProcessingResponse]:
        """The whole body is in: the pick in the headers answer, then the body, re-chunked."""
        ctx.body = duplex.body()
        ctx.body_complete = True
        first = await self.p._decide(ctx, rt, "headers", stream, duplex=True)
        if first.WhichOneof("response") == "immediate_response":
            duplex.answered = True
            return [first]  # Envoy answers the client; the body is not needed any more
        return [first, *duplex.release(end_of_stream=not trailers)]
