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
