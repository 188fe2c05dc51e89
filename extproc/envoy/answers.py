"""Building ext_proc answers for Envoy.

The answers are few and mostly constant (one per endpoint per phase), so they are built
once and reused: constructing nested protobuf messages is the largest per-request cost
left in Python once parsing happens in C.
"""

from __future__ import annotations

import functools
import json

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2

# The Gateway API Inference Extension endpoint-picker protocol.
DEST_HEADER = "x-gateway-destination-endpoint"
DEST_METADATA_NS = "envoy.lb"
# llm-d's convention: the prefill server of a prefill/decode pick, read by the PD sidecar
# in front of the decode server. Set by ai-lb alone: any other value is removed.
PREFILL_HEADER = "x-prefiller-host-port"
ROLE_HEADERS = {"prefill": PREFILL_HEADER}  # Pick.also roles -> the header naming that endpoint

PM = processing_mode_pb2.ProcessingMode
_ERROR_TYPES = {429: "rate_limit_exceeded", 503: "service_unavailable"}
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


@functools.lru_cache(maxsize=None)  # interned: answers are cached by id(mode)
def processing_mode(body: bool, response_headers: bool, response_body: bool, buffered: bool = False,
                    hold: bool = True) -> PM:
    """The processing mode a routed request needs from Envoy.

    ``hold``: ``response_trailer_mode: SEND``, which makes "done" correct when the stream
    tells it (``completions: stream``): Envoy closes the ext_proc stream as soon as it
    expects no further message, so without a later phase subscribed the stream would end
    right after our answer, long before the response. Trailers come last (and most
    HTTP/1.1 LLM responses have none, so this costs no message), keeping the stream open
    exactly as long as the HTTP stream. Without ``hold`` (the access log tells the end)
    the stream ends with the answer: one blocking round trip.
    """
    return PM(
        request_header_mode=PM.SEND,
        # BUFFERED_PARTIAL by default, not BUFFERED: a body over Envoy's buffer limit
        # reaches us truncated (and falls back) instead of failing the request with 413.
        request_body_mode=(PM.BUFFERED if buffered else PM.BUFFERED_PARTIAL) if body else PM.NONE,
        response_header_mode=PM.SEND if response_headers else PM.SKIP,
        response_body_mode=PM.STREAMED if response_body else PM.NONE,
        request_trailer_mode=PM.SKIP,
        response_trailer_mode=PM.SEND if hold else PM.SKIP,
    )


class Answers:
    """Prebuilt answers, cached per endpoint (or destination list) and per processing mode."""

    MAX_CACHED = 8192  # destination lists with fallbacks vary; the cache starts over past this

    def __init__(self) -> None:
        self._pick: dict[tuple[str, str, int], pb.ProcessingResponse] = {}
        self._pass: dict[tuple[str, int], pb.ProcessingResponse] = {}
        self.response_headers = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
        self.response_body = pb.ProcessingResponse(response_body=pb.BodyResponse())
        self.request_trailers = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
        self.response_trailers = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
        self._bytes: dict[int, tuple[pb.ProcessingResponse, bytes]] = {}

    def serialized(self, resp: pb.ProcessingResponse) -> bytes:
        """``resp`` as bytes, serialized once per cached answer (the one-trip path appends
        the request's completion id to these bytes). Keyed by identity; the entry holds
        ``resp``, so the id is never reused while cached."""
        hit = self._bytes.get(id(resp))
        if hit is None:
            if len(self._bytes) > self.MAX_CACHED:
                self._bytes.clear()
            hit = self._bytes[id(resp)] = (resp, resp.SerializeToString())
        return hit[1]

    def pick(self, phase: str, address: str, mode: PM | None = None, also: tuple = ()) -> pb.ProcessingResponse:
        """Route to ``address`` (``ip:port``, or the GIE list ``primary,fallback,...``): header
        and dynamic metadata, the same value, both set by us alone. ``also`` (``Pick.also``)
        names the other endpoints the request uses: a prefill server goes in
        ``x-prefiller-host-port``, which is removed when there is none."""
        if len(self._pick) > self.MAX_CACHED:
            self._pick.clear()
        extra = tuple((ROLE_HEADERS[r], e.address) for r, e in also if r in ROLE_HEADERS)
        return self._cached(self._pick, (phase, address, id(mode), extra), phase, mode,
                            set_header=(DEST_HEADER, address), metadata=address, extra=extra)

    def to_cluster(self, phase: str, header: str, cluster: str, mode: PM | None = None) -> pb.ProcessingResponse:
        """Rewrite the route's cluster header and have Envoy re-evaluate the route."""
        return self._cached(self._pick, (phase, f"{header}\0{cluster}", id(mode)), phase, mode,
                            set_header=(header, cluster), remove=True, clear_route_cache=True)

    def passthrough(self, phase: str, mode: PM | None = None) -> pb.ProcessingResponse:
        """No pick (yet): only strip any client-supplied routing header."""
        return self._cached(self._pass, (phase, id(mode)), phase, mode, remove=True)

    @staticmethod
    def _cached(cache: dict, key: tuple, phase: str, mode: PM | None, set_header: tuple[str, str] | None = None,
                metadata: str | None = None, remove: bool = False, clear_route_cache: bool = False,
                extra: tuple | None = None) -> pb.ProcessingResponse:
        r = cache.get(key)
        if r is None:
            common = pb.CommonResponse(clear_route_cache=clear_route_cache)
            for k, v in ((set_header,) if set_header is not None else ()) + (extra or ()):
                common.header_mutation.set_headers.append(base_pb2.HeaderValueOption(
                    header=base_pb2.HeaderValue(key=k, raw_value=v.encode()), append_action=_OVERWRITE))
            if extra is not None and not extra:  # an endpoint pick without a prefill server
                common.header_mutation.remove_headers.append(PREFILL_HEADER)
            if remove:
                common.header_mutation.remove_headers.extend((DEST_HEADER, PREFILL_HEADER))
            r = _wrap(phase, common)
            if metadata is not None:
                r.dynamic_metadata.fields[DEST_METADATA_NS].struct_value.fields[DEST_HEADER].string_value = metadata
            if mode is not None:
                r.mode_override.CopyFrom(mode)
            cache[key] = r
        return r

    @staticmethod
    def reject(status: int, message: str, retry_after: int | None = None) -> pb.ProcessingResponse:
        """An immediate answer in OpenAI's error shape (clients' SDKs parse it and retry
        429/503 with ``Retry-After``)."""
        kind = _ERROR_TYPES.get(status, "ai_lb_rejected")
        body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": kind}}).encode()
        ir = pb.ImmediateResponse(status=http_status_pb2.HttpStatus(code=status), body=body, details="ai_lb_rejected")
        headers = [("content-type", "application/json")]
        if retry_after is not None:
            headers.append(("retry-after", str(retry_after)))
        for k, v in headers:
            ir.headers.set_headers.append(base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=k, raw_value=v.encode()), append_action=_OVERWRITE))
        return pb.ProcessingResponse(immediate_response=ir)


def _wrap(phase: str, common: pb.CommonResponse) -> pb.ProcessingResponse:
    if phase == "headers":
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common))
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))
