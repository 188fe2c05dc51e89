"""Envoy's gRPC access log service (``envoy.access_loggers.http_grpc``) as the completion
channel: one entry per finished request, streamed off the request path.

* The id: ai-lb's answer carries ``dynamic_metadata["ai_lb"]["id"]`` (``tag``); Envoy logs
  the stream's dynamic metadata with the entry (``common_properties.metadata``), so the
  entry names the request it ends. A client cannot set dynamic metadata.
* The end: ``response.response_code``, ``response_flags`` (an upstream connection failure
  or reset is an error against the endpoint; a downstream abort says nothing about it),
  ``upstream_remote_address`` (the host that served the last attempt, after retries) and
  ``time_to_first_upstream_rx_byte``.

Envoy sends entries per worker thread on one long-lived stream per thread, so an entry
costs ai-lb one small protobuf parse, not a gRPC stream. The reference disables Envoy's
batching (``buffer_size_bytes: 0``): a batch's few milliseconds keep the endpoint that just
answered counted busy when the same client's next request arrives.
"""

from __future__ import annotations

import logging
from typing import Any

from envoy.service.accesslog.v3 import als_pb2

from .completions import Completions, Settled

log = logging.getLogger("ai_lb.access_log")

SERVICE = "envoy.service.accesslog.v3.AccessLogService"
METHOD = f"/{SERVICE}/StreamAccessLogs"
NAMESPACE = "ai_lb"
ID_KEY = "id"
decode = als_pb2.StreamAccessLogsMessage.FromString
_EOF: Any = None


def tag(raw: bytes, cid: str) -> bytes:
    """``raw`` (a serialized ProcessingResponse) with ``dynamic_metadata["ai_lb"]["id"] =
    cid`` added. Serialized messages concatenate as a merge: the map entry for namespace
    ``ai_lb`` joins the answer's others (``envoy.lb``), so a cached answer is reused as
    bytes and only the id is appended per request (everything before the id's bytes
    depends only on its length: cached)."""
    v = cid.encode()
    head = _heads.get(len(v))
    if head is None:
        head = _heads[len(v)] = _head(len(v))
    return raw + head + v


_heads: dict[int, bytes] = {}


def _head(n: int) -> bytes:
    value = b"\x1a" + _varint(n)                                            # Value.string_value (3)
    field = b"\x0a" + _varint(2) + ID_KEY.encode() + b"\x12" + _varint(len(value) + n) + value  # map entry
    inner = b"\x0a" + _varint(len(field) + n) + field                      # Struct.fields (1)
    value2 = b"\x2a" + _varint(len(inner) + n) + inner                     # Value.struct_value (5)
    ns = NAMESPACE.encode()
    entry = b"\x0a" + _varint(len(ns)) + ns + b"\x12" + _varint(len(value2) + n) + value2
    outer = b"\x0a" + _varint(len(entry) + n) + entry                      # Struct.fields (1)
    return b"\x42" + _varint(len(outer) + n) + outer                       # ProcessingResponse.dynamic_metadata (8)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


class Tagged:
    """An answer already serialized (the native transport writes ``SerializeToString()``).
    Anything else asked of it (tests, ``WhichOneof``) is answered by the parsed message."""

    __slots__ = ("raw", "_msg")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._msg = None

    def SerializeToString(self) -> bytes:  # noqa: N802 - the protobuf name the transport calls
        return self.raw

    def __getattr__(self, name: str) -> Any:
        if self._msg is None:
            from envoy.service.ext_proc.v3 import external_processor_pb2 as pb  # noqa: PLC0415

            self._msg = pb.ProcessingResponse.FromString(self.raw)
        return getattr(self._msg, name)


def settled(entry: Any) -> tuple[str, Settled] | None:
    """(id, what ended) of one HTTPAccessLogEntry; None for a request ai-lb did not tag.
    Reads only the fields it needs: an entry has some twenty, and every field read from
    the parsed message costs a Python object (this runs once per routed request)."""
    cp = entry.common_properties
    md = cp.metadata.filter_metadata.get(NAMESPACE)
    if md is None:
        return None
    v = md.fields.get(ID_KEY)
    cid = v.string_value if v is not None else ""
    if not cid:
        return None
    code = entry.response.response_code.value  # an unset wrapper reads 0: no response
    # Envoy leaves the flags out when none is set
    status, outcome = _flagged(cp.response_flags, code) if cp.HasField("response_flags") else _by_code(code)
    sa = cp.upstream_remote_address.socket_address
    host = sa.address
    served = None
    if host:
        served = f"[{host}]:{sa.port_value}" if ":" in host else f"{host}:{sa.port_value}"
    first = None
    if cp.HasField("time_to_first_upstream_rx_byte"):
        d = cp.time_to_first_upstream_rx_byte
        first = d.seconds + d.nanos / 1e9
    return cid, Settled(status, served, first, outcome)


def _by_code(code: int) -> tuple[int | None, str]:
    """Status and outcome from the response code alone (0: no response came)."""
    if code:
        return code, ("error" if code >= 500 else "complete")
    return None, "reset"


def _flagged(f: Any, code: int) -> tuple[int | None, str]:
    """Status and outcome of an entry with response flags."""
    if f.downstream_connection_termination or f.downstream_remote_reset:
        return None, "reset"       # the client went away: nothing said about the endpoint
    if (f.upstream_connection_failure or f.upstream_remote_reset or f.upstream_connection_termination
            or f.upstream_request_timeout or f.upstream_protocol_error):
        return (code if code >= 500 else 0), "error"
    return _by_code(code)


class AccessLogSink:
    """The ``StreamAccessLogs`` handler (client streaming: entries in, one empty answer)."""

    def __init__(self, completions: Completions) -> None:
        self.completions = completions
        self.entries = 0
        self.untagged = 0

    def handle(self, msg: Any) -> None:
        settle = self.completions.settle
        for e in msg.http_logs.log_entry:
            self.entries += 1
            try:
                r = settled(e)
            except Exception as ex:  # noqa: BLE001 - one odd entry must not drop the stream
                log.debug("access log entry not understood: %r", ex)
                r = None
            if r is None:
                self.untagged += 1
                continue
            settle(*r)

    async def serve(self, stream: Any) -> None:
        import grpc  # noqa: PLC0415 - the EOF sentinel, shared by both transports

        eof = grpc.aio.EOF
        c = self.completions
        c.streams += 1
        try:
            while True:
                msg = await stream.read()
                if msg is eof:
                    break
                self.handle(msg)
        finally:
            c.streams -= 1
        await stream.write(als_pb2.StreamAccessLogsResponse())


def add_to_grpcio(server: Any, sink: AccessLogSink) -> None:
    """Serve ``StreamAccessLogs`` on a grpcio server (``server.transport: grpcio``)."""
    import grpc  # noqa: PLC0415

    async def stream_access_logs(request_iterator, context):
        sink.completions.streams += 1
        try:
            async for msg in request_iterator:
                sink.handle(msg)
        finally:
            sink.completions.streams -= 1
        return als_pb2.StreamAccessLogsResponse()

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "StreamAccessLogs": grpc.stream_unary_rpc_method_handler(
            stream_access_logs, request_deserializer=decode,
            response_serializer=als_pb2.StreamAccessLogsResponse.SerializeToString)}),))
