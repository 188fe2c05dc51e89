"""A small gRPC-over-HTTP/2 (h2c) server on asyncio, for Envoy's ext_proc streams.

Why not grpcio's server: every ext_proc stream is several gRPC events (open, message,
answer, half-close, status), and grpcio's Python servers hop each event between its
C-core poller thread and the event loop. Measured on the 2-core CI machine, that costs
0.7-1.1 ms of CPU per stream (aio and sync servers alike, grpcio 1.62 and 1.85), which is
more than the whole latency budget of a load balancer. Parsing frames in the event loop
thread costs a small fraction of that (see docs/benchmarks.md). Protobuf parsing is still
upb's C parser through the ``xds-protos`` classes.

Scope, on purpose: cleartext HTTP/2 with prior knowledge (what Envoy's gRPC client speaks
to a cluster with ``http2_protocol_options``), unary and bidirectional-streaming methods
with uncompressed messages, flow control in both directions, CONTINUATION, padding,
PING, GOAWAY and RST_STREAM. TLS and compression are not implemented: for those, run
with ``server.transport: grpcio``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
from typing import Any, Awaitable, Callable

import grpc
import hpack

log = logging.getLogger("ai_lb.h2")

EOF = grpc.aio.EOF  # the same end-of-stream sentinel as grpcio, so handlers run on both

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
F_END_STREAM, F_ACK, F_END_HEADERS, F_PADDED, F_PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS, S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE = 1, 2, 3, 4, 5
MIN_FRAME_SIZE, MAX_FRAME_SIZE = 1 << 14, (1 << 24) - 1  # RFC 9113 6.5.2: SETTINGS_MAX_FRAME_SIZE bounds
E_NO_ERROR, E_PROTOCOL_ERROR, E_FLOW_CONTROL, E_FRAME_SIZE, E_CANCEL = 0x0, 0x1, 0x3, 0x6, 0x8
MAX_WINDOW = 2**31 - 1
OUR_MAX_FRAME = 1 << 20       # fewer, larger DATA frames for big prompts
WINDOW_REFILL = 1 << 24       # refill the connection window after this much data
MAX_MESSAGE = 64 << 20

GRPC_OK, GRPC_CANCELLED, GRPC_INTERNAL, GRPC_UNIMPLEMENTED, GRPC_RESOURCE_EXHAUSTED = 0, 1, 13, 12, 8

_HDR = struct.Struct(">HBBBI")  # 24-bit length as 16+8, type, flags, stream id
_U32 = struct.Struct(">I")


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _HDR.pack(n >> 8, n & 0xFF, ftype, flags, sid) + payload


def _hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """HPACK literal without indexing, new name: stateless, so it is safe to precompute."""
    return b"\x00" + _hpack_int(len(name), 7) + name + _hpack_int(len(value), 7) + value


# :status 200 (static index 8) and content-type: application/grpc.
RESPONSE_HEADERS = b"\x88" + _literal(b"content-type", b"application/grpc")


def trailers_block(status: int, message: str = "") -> bytes:
    b = _literal(b"grpc-status", str(status).encode())
    if message:
        from urllib.parse import quote

        b += _literal(b"grpc-message", quote(message, safe=" ").encode())
    return b


TRAILERS_OK = trailers_block(GRPC_OK)

Handler = Callable[["GrpcStream"], Awaitable[None]]
Decoder = Callable[[bytes], Any]


class Method:
    """A served method: how to decode its messages, and the coroutine that serves a stream."""

    __slots__ = ("decode", "handler")

    def __init__(self, decode: Decoder, handler: Handler) -> None:
        self.decode = decode
        self.handler = handler


class GrpcStream:
    """One gRPC call; ``read``/``write`` mirror grpcio's servicer-context API."""

    __slots__ = ("conn", "sid", "method", "buf", "msgs", "waiter", "remote_closed", "task",
                 "headers_sent", "send_window", "pending", "closed")

    def __init__(self, conn: "H2Connection", sid: int, method: Method) -> None:
        self.conn = conn
        self.sid = sid
        self.method = method
        self.buf = bytearray()
        self.msgs: collections.deque = collections.deque()
        self.waiter: asyncio.Future | None = None
        self.remote_closed = False
        self.task: asyncio.Task | None = None
        self.headers_sent = False
        self.send_window = conn.peer_initial_window
        self.pending: collections.deque[tuple[bool, bytes]] = collections.deque()  # (is_trailers, bytes) awaiting window
        self.closed = False

    async def read(self) -> Any:
        while True:
            if self.msgs:
                return self.msgs.popleft()
            if self.remote_closed:
                return EOF
            self.waiter = self.conn.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    async def write(self, msg: Any) -> None:
        self.conn.send_message(self, msg.SerializeToString())

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)


class H2Connection(asyncio.Protocol):
    def __init__(self, server: "GrpcServer") -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.inbuf = bytearray()
        self.preface_ok = False
        self.decoder = hpack.Decoder()
        self.path_cache: dict[bytes, str] = {}
        self.streams: dict[int, GrpcStream] = {}
        self.blocked: dict[int, GrpcStream] = {}  # streams with output waiting for window
        self.peer_initial_window = 65535
        self.peer_max_frame = 16384
        self.conn_send_window = 65535
        self.recv_unacked = 0
        self.last_sid = 0
        self.cont: tuple[int, int, bytearray] | None = None  # (sid, flags, header block) awaiting CONTINUATION
        self.goaway = False

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        settings = b"".join(struct.pack(">HI", k, v) for k, v in (
            (S_MAX_CONCURRENT_STREAMS, 1 << 20), (S_INITIAL_WINDOW_SIZE, MAX_WINDOW), (S_MAX_FRAME_SIZE, OUR_MAX_FRAME)))
        transport.write(frame(SETTINGS, 0, 0, settings) + frame(WINDOW_UPDATE, 0, 0, _U32.pack(MAX_WINDOW - 65535)))  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for s in list(self.streams.values()):
            self._cancel(s)
        self.streams.clear()
        self.blocked.clear()

    def data_received(self, data: bytes) -> None:
        buf = self.inbuf
        buf += data
        pos = 0
        if not self.preface_ok:
            if len(buf) < len(PREFACE):
                return
            if buf[:len(PREFACE)] != PREFACE:
                self._close_connection(E_PROTOCOL_ERROR, "not an HTTP/2 prior-knowledge client")
                return
            self.preface_ok = True
            pos = len(PREFACE)
        n = len(buf)
        try:
            while n - pos >= 9:
                length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
                end = pos + 9 + length
                if end > n:
                    break
                ftype, flags = buf[pos + 3], buf[pos + 4]
                sid = _U32.unpack_from(buf, pos + 5)[0] & 0x7FFFFFFF
                payload = bytes(buf[pos + 9:end])
                pos = end
                self._frame(ftype, flags, sid, payload)
        except _ConnectionError as e:
            self._close_connection(e.code, str(e))
            return
        if pos:
            del buf[:pos]

    # -- frames in --------------------------------------------------------------------
    def _frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self.cont is not None and ftype != CONTINUATION:
            raise _ConnectionError(E_PROTOCOL_ERROR, "expected CONTINUATION")
        if ftype == DATA:
            self._data(flags, sid, payload)
        elif ftype == HEADERS:
            self._headers(flags, sid, payload)
        elif ftype == CONTINUATION:
            if self.cont is None or self.cont[0] != sid:
                raise _ConnectionError(E_PROTOCOL_ERROR, "unexpected CONTINUATION")
            self.cont[2].extend(payload)
            if flags & F_END_HEADERS:
                csid, cflags, block = self.cont
                self.cont = None
                self._header_block(csid, cflags, bytes(block))
        elif ftype == RST_STREAM:
            s = self.streams.pop(sid, None)
            if s is not None:
                self._cancel(s)
        elif ftype == SETTINGS:
            if not flags & F_ACK:
                self._settings(payload)
        elif ftype == WINDOW_UPDATE:
            self._window_update(sid, payload)
        elif ftype == PING:
            if not flags & F_ACK:
                self._write(frame(PING, F_ACK, 0, payload))
        elif ftype == GOAWAY:
            self.goaway = True
            if not self.streams and self.transport:
                self.transport.close()
        elif ftype == PUSH_PROMISE:
            raise _ConnectionError(E_PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 requires.

    def _data(self, flags: int, sid: int, payload: bytes) -> None:
        self.recv_unacked += len(payload)  # flow control counts padding too
        if self.recv_unacked >= WINDOW_REFILL:
            self._write(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.recv_unacked)))
            self.recv_unacked = 0
        s = self.streams.get(sid)
        if s is None or s.remote_closed:
            return  # stream already finished or reset: drop its data
        if flags & F_PADDED:
            pad = payload[0]
            payload = payload[1:len(payload) - pad]
        buf = s.buf
        if not buf and len(payload) >= 5:
            # Fast path: a whole message in one frame (the common case) is sliced, not copied twice.
            mlen = _U32.unpack_from(payload, 1)[0]
            if len(payload) == 5 + mlen and payload[0] == 0:
                self._deliver(s, payload[5:])
                payload = b""
        if payload:
            buf += payload
            while len(buf) >= 5:
                if buf[0] != 0:
                    self._reset(s, GRPC_UNIMPLEMENTED, "compressed messages are not supported")
                    return
                mlen = _U32.unpack_from(buf, 1)[0]
                if mlen > MAX_MESSAGE:
                    self._reset(s, GRPC_RESOURCE_EXHAUSTED, f"message of {mlen} bytes exceeds {MAX_MESSAGE}")
                    return
                if len(buf) < 5 + mlen:
                    break
                msg = bytes(buf[5:5 + mlen])
                del buf[:5 + mlen]
                self._deliver(s, msg)
        if flags & F_END_STREAM:
            s.remote_closed = True
            s._wake()

    def _deliver(self, s: GrpcStream, raw: bytes) -> None:
        try:
            s.msgs.append(s.method.decode(raw))
        except Exception as e:  # noqa: BLE001 - a bad message fails its call, not the connection
            self._reset(s, GRPC_INTERNAL, f"cannot parse request message: {e}")
            return
        s._wake()

    def _headers(self, flags: int, sid: int, payload: bytes) -> None:
        start = 0
        end = len(payload)
        if flags & F_PADDED:
            start = 1
            end -= payload[0]
        if flags & F_PRIORITY:
            start += 5
        block = payload[start:end]
        if flags & F_END_HEADERS:
            self._header_block(sid, flags, block)
        else:
            self.cont = (sid, flags, bytearray(block))

    def _header_block(self, sid: int, flags: int, block: bytes) -> None:
        path = self._path_of(block)
        s = self.streams.get(sid)
        if s is not None:  # trailers from the client end its side of the stream
            if flags & F_END_STREAM:
                s.remote_closed = True
                s._wake()
            return
        if sid % 2 == 0 or sid <= self.last_sid:
            return  # not a new client stream (or one we already closed): ignore
        self.last_sid = sid
        method = self.server.methods.get(path)
        if method is None or self.goaway:
            self._write(frame(HEADERS, F_END_HEADERS | F_END_STREAM, sid,
                              RESPONSE_HEADERS + trailers_block(GRPC_UNIMPLEMENTED, f"unknown method {path}")))
            return
        s = GrpcStream(self, sid, method)
        self.streams[sid] = s
        if flags & F_END_STREAM:
            s.remote_closed = True
        s.task = self.loop.create_task(self._run(s))

    async def _run(self, s: GrpcStream) -> None:
        try:
            await s.method.handler(s)
        except asyncio.CancelledError:
            return
        except GrpcError as e:
            self._finish(s, trailers_block(e.status, e.message))
            return
        except Exception as e:  # noqa: BLE001
            log.warning("gRPC handler failed: %r", e)
            self._finish(s, trailers_block(GRPC_INTERNAL, type(e).__name__))
            return
        self._finish(s, TRAILERS_OK)

    def _path_of(self, block: bytes) -> str:
        """Decode a header block and return its ``:path``.

        Envoy opens a stream per HTTP request with the same headers each time; once they
        sit in HPACK's dynamic table the block bytes repeat exactly. A block whose decoding
        left the dynamic table untouched can be skipped the next time (same bytes + same
        table = same headers), which removes HPACK (Huffman) decoding from the hot path.
        Any block that changes the table invalidates the cache.
        """
        path = self.path_cache.get(block)
        if path is not None:
            return path
        ents = self.decoder.header_table.dynamic_entries
        before = (len(ents), id(ents[0]) if ents else 0, self.decoder.header_table.maxsize)
        try:
            headers = self.decoder.decode(block, raw=True)
        except Exception as e:  # noqa: BLE001 - HPACK state is now unknown: the connection is lost
            raise _ConnectionError(0x9, f"HPACK decoding failed: {e}") from None
        path = ""
        for k, v in headers:
            if k == b":path":
                path = v.decode("latin-1")
                break
        if (len(ents), id(ents[0]) if ents else 0, self.decoder.header_table.maxsize) == before:
            if len(self.path_cache) < 4096:
                self.path_cache[block] = path
        else:
            self.path_cache.clear()
        return path

    def _settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise _ConnectionError(E_FRAME_SIZE, "bad SETTINGS length")
        for i in range(0, len(payload), 6):
            k, v = struct.unpack_from(">HI", payload, i)
            if k == S_INITIAL_WINDOW_SIZE:
                if v > MAX_WINDOW:
                    raise _ConnectionError(E_FLOW_CONTROL, "initial window too large")
                delta = v - self.peer_initial_window
                self.peer_initial_window = v
                for s in self.streams.values():
                    s.send_window += delta
            elif k == S_MAX_FRAME_SIZE:
                # RFC 9113 6.5.2: a value outside [2^14, 2^24-1] is a connection error. A
                # value of 0 once made the flush loop below send empty frames forever.
                if not MIN_FRAME_SIZE <= v <= MAX_FRAME_SIZE:
                    raise _ConnectionError(E_PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {v} out of range")
                self.peer_max_frame = v
            elif k == S_ENABLE_PUSH:
                if v > 1:
                    raise _ConnectionError(E_PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH {v} is not 0 or 1")
            elif k == S_HEADER_TABLE_SIZE:
                pass  # we never index when encoding, so the peer's table size is irrelevant
        self._write(frame(SETTINGS, F_ACK, 0))
        self._flush_pending()

    def _window_update(self, sid: int, payload: bytes) -> None:
        inc = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if sid == 0:
            self.conn_send_window += inc
        else:
            s = self.streams.get(sid)
            if s is None:
                return
            s.send_window += inc
        self._flush_pending()

    # -- frames out -------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_message(self, s: GrpcStream, raw: bytes) -> None:
        if s.closed:
            return
        payload = b"\x00" + _U32.pack(len(raw)) + raw
        out = b""
        if not s.headers_sent:
            s.headers_sent = True
            out = frame(HEADERS, F_END_HEADERS, s.sid, RESPONSE_HEADERS)
        if not s.pending and len(payload) <= min(self.conn_send_window, s.send_window, self.peer_max_frame):
            self.conn_send_window -= len(payload)
            s.send_window -= len(payload)
            self._write(out + frame(DATA, 0, s.sid, payload))
            return
        if out:
            self._write(out)
        s.pending.append((False, payload))
        self.blocked[s.sid] = s
        self._flush_pending()

    def _finish(self, s: GrpcStream, trailers: bytes) -> None:
        """Send the status; a call that never wrote gets a trailers-only response."""
        if s.closed:
            return
        block = trailers if s.headers_sent else RESPONSE_HEADERS + trailers
        s.headers_sent = True
        if s.pending:
            s.pending.append((True, block))  # sent after the data ahead of it
            return
        self._end(s, block)

    def _end(self, s: GrpcStream, block: bytes) -> None:
        s.closed = True
        self._write(frame(HEADERS, F_END_HEADERS | F_END_STREAM, s.sid, block))
        if self.streams.get(s.sid) is s:
            if s.remote_closed:
                del self.streams[s.sid]
            else:  # we are done but the client is not: tell it to stop sending
                del self.streams[s.sid]
                self._write(frame(RST_STREAM, 0, s.sid, _U32.pack(E_NO_ERROR)))
        if self.goaway and not self.streams and self.transport:
            self.transport.close()

    def _flush_pending(self) -> None:
        """Send what flow control held back; only streams that have something waiting are
        visited, so a window update costs nothing for the thousands of idle streams."""
        for sid, s in list(self.blocked.items()):
            while s.pending:
                is_trailers, item = s.pending[0]
                if is_trailers:
                    s.pending.popleft()
                    self._end(s, item)
                    break
                room = min(self.conn_send_window, s.send_window)
                if room <= 0:
                    break
                chunk = item[:min(room, self.peer_max_frame)]  # both >= 1 here: always progresses
                self.conn_send_window -= len(chunk)
                s.send_window -= len(chunk)
                self._write(frame(DATA, 0, s.sid, chunk))
                if len(chunk) == len(item):
                    s.pending.popleft()
                else:
                    s.pending[0] = (False, item[len(chunk):])
            if not s.pending or s.closed:
                self.blocked.pop(sid, None)

    def _reset(self, s: GrpcStream, status: int, message: str) -> None:
        log.warning("gRPC stream %d failed: %s", s.sid, message)
        self.streams.pop(s.sid, None)
        self._cancel(s)
        if not s.closed:
            s.closed = True
            block = (b"" if s.headers_sent else RESPONSE_HEADERS) + trailers_block(status, message)
            self._write(frame(HEADERS, F_END_HEADERS | F_END_STREAM, s.sid, block))
            self._write(frame(RST_STREAM, 0, s.sid, _U32.pack(E_CANCEL)))

    def _cancel(self, s: GrpcStream) -> None:
        s.closed = True
        self.blocked.pop(s.sid, None)
        if s.task is not None and not s.task.done():
            s.task.cancel()

    def _close_connection(self, code: int, why: str) -> None:
        log.warning("closing HTTP/2 connection: %s", why)
        self._write(frame(GOAWAY, 0, 0, _U32.pack(self.last_sid) + _U32.pack(code) + why.encode()[:200]))
        if self.transport:
            self.transport.close()

    def shutdown(self) -> None:
        """Stop taking new calls; close once the running ones finish."""
        self._write(frame(GOAWAY, 0, 0, _U32.pack(self.last_sid) + _U32.pack(E_NO_ERROR)))
        self.goaway = True
        if not self.streams and self.transport:
            self.transport.close()


class GrpcError(Exception):
    """Raised by a handler to end its call with a non-OK gRPC status."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _ConnectionError(Exception):
    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code


class GrpcServer:
    """Serves registered methods (``/package.Service/Method``) on one TCP listener."""

    def __init__(self) -> None:
        self.methods: dict[str, Method] = {}
        self.connections: set[H2Connection] = set()
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    def add_method(self, path: str, decode: Decoder, handler: Handler) -> None:
        self.methods[path] = Method(decode, handler)

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: H2Connection(self), host, port, reuse_address=True, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self, grace: float) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self.connections):
            c.shutdown()
        deadline = asyncio.get_running_loop().time() + grace
        while any(c.streams for c in self.connections) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        for c in list(self.connections):
            if c.transport:
                c.transport.close()
