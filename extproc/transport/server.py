"""The asyncio side: a Protocol that feeds the sans-IO HTTP/2 connection, one task per
gRPC call, and the public API (``GrpcServer``, ``GrpcStream``, ``GrpcError``, ``EOF``),
the same as grpcio's servicer-context ``read()``/``write()`` so handlers run on both."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, Awaitable, Callable

import grpc

from . import grpc as g
from .h2 import events as ev
from .h2.connection import H2ServerConnection
from .h2.frames import E_INTERNAL_ERROR
from .limits import DEFAULT_LIMITS, H2Limits
from .tls import ReloadingTls

log = logging.getLogger("ai_lb.h2")

EOF = grpc.aio.EOF  # the same end-of-stream sentinel as grpcio

Handler = Callable[["GrpcStream"], Awaitable[None]]
Decoder = Callable[[bytes], Any]


class GrpcError(Exception):
    """Raised by a handler to end its call with a non-OK gRPC status."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Method:
    """A served method: how to decode its messages, and the coroutine that serves a stream."""

    __slots__ = ("decode", "handler")

    def __init__(self, decode: Decoder, handler: Handler) -> None:
        self.decode = decode
        self.handler = handler


class GrpcStream:
    """One gRPC call. A message's bytes go back to the client's flow-control window only
    when the handler reads it, so a slow handler slows its client instead of buffering."""

    __slots__ = ("proto", "sid", "method", "reader", "msgs", "waiter", "remote_closed", "task", "headers_sent",
                 "closed")

    def __init__(self, proto: "H2Protocol", sid: int, method: Method) -> None:
        self.proto = proto
        self.sid = sid
        self.method = method
        self.reader: g.MessageReader | None = None  # made for the first message not whole in one frame
        self.msgs: collections.deque[tuple[Any, int]] = collections.deque()  # (message, wire bytes)
        self.waiter: asyncio.Future | None = None
        self.remote_closed = False
        self.task: asyncio.Task | None = None
        self.headers_sent = False
        self.closed = False

    async def read(self) -> Any:
        while True:
            if self.msgs:
                msg, size = self.msgs.popleft()
                proto = self.proto
                proto.conn.acknowledge(self.sid, size)
                if proto.conn.out.buf:  # a WINDOW_UPDATE came due
                    proto._schedule_flush()
                return msg
            if self.remote_closed or self.closed:
                return EOF
            self.waiter = self.proto.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    async def write(self, msg: Any) -> None:
        self.proto.send_message(self, msg.SerializeToString())

    def write_last(self, msg: Any) -> None:
        """The call's last message: it leaves with the status trailers, in one send, when
        the handler returns right after (grpcio has no such call: use ``write``)."""
        self.proto.send_message(self, msg.SerializeToString(), flush=False)

    def received(self, data: bytes, end_stream: int) -> None:
        """Request bytes in: queue the messages they complete, wake the handler. Raises
        ``GrpcStatusError`` for a message the call cannot take (the call then fails)."""
        reader = self.reader
        proto = self.proto
        if data:
            raw = g.whole_message(data, proto._max_message) if reader is None else None
            if raw is not None:
                raws: Any = (raw,)
            else:
                if reader is None:
                    reader = self.reader = g.MessageReader(proto._max_message)
                raws = reader.feed(data)
            for raw in raws:
                try:
                    msg = self.method.decode(raw)
                except Exception as e:  # noqa: BLE001 - a bad message fails its call, not the connection
                    raise g.GrpcStatusError(g.INTERNAL, f"cannot parse request message: {e}") from None
                self.msgs.append((msg, len(raw) + 5))
            if reader is not None and reader.buf:  # a message still incomplete: make room for it
                proto.conn.expect(self.sid, reader.missing)
        if end_stream:
            if reader is not None:
                reader.finish()
            self.remote_closed = True
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)
            self.proto._batch += 1


class H2Protocol(asyncio.Protocol):
    """One client connection: bytes to ``H2ServerConnection``, its events to calls."""

    def __init__(self, server: "GrpcServer") -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.conn = H2ServerConnection(server.limits)
        self._max_message = server.limits.max_message_size
        self.calls: dict[int, GrpcStream] = {}
        self.transport: asyncio.Transport | None = None
        self._receiving = False
        self._batch = 0  # calls the last data_received started or woke: they run next
        self._flush_handle: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def streams(self) -> dict[int, GrpcStream]:
        """Calls in progress (what ``GrpcServer.stop`` waits for)."""
        return self.calls

    # -- asyncio.Protocol ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        self.conn.initiate()
        self._flush()
        self._arm_timer(self.conn.check_timeouts(time.monotonic()))

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self._cancel_all()
        if self._timer is not None:
            self._timer.cancel()
        if self._flush_handle is not None:
            self._flush_handle.cancel()

    def pause_writing(self) -> None:  # the client does not read: stop reading it too
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self._receiving = True
        try:
            events = self.conn.receive_data(data)
            if self.conn.closed:
                self._cancel_all()  # a connection error: whatever else came with it is moot
            else:
                self._dispatch(events)
        except Exception as e:  # noqa: BLE001 - a bug here must cost this connection, not the server
            log.exception("HTTP/2 connection failed")
            self.conn.close(E_INTERNAL_ERROR, f"internal error: {type(e).__name__}")
            self._cancel_all()
        self._receiving = False
        self._flush()

    # -- events ----------------------------------------------------------------------------
    def _dispatch(self, events: list) -> None:
        conn = self.conn
        self._batch = 0
        for e in events:
            kind, sid = e[0], e[1]
            if kind == ev.DATA:
                s = self.calls.get(sid)
                if s is None:
                    if e[2]:
                        conn.acknowledge(sid, len(e[2]))
                    continue
                self._data(s, e[2], e[3])
            elif kind == ev.REQUEST:
                method = self.server.methods.get(e[2])
                if method is None:
                    conn.end_stream(sid, g.RESPONSE_HEADERS + g.trailers_block(g.UNIMPLEMENTED, f"unknown method {e[2]}"))
                    continue
                s = GrpcStream(self, sid, method)
                s.remote_closed = bool(e[3])
                self.calls[sid] = s
                s.task = self.loop.create_task(self._run(s))
                self._batch += 1
            elif kind == ev.RESET:
                s = self.calls.pop(sid, None)
                if s is not None:
                    self._cancel(s)

    def _data(self, s: GrpcStream, data: bytes, end_stream: int) -> None:
        try:
            s.received(data, end_stream)
        except g.GrpcStatusError as e:
            self._fail(s, e.status, e.message)

    async def _run(self, s: GrpcStream) -> None:
        try:
            await s.method.handler(s)
        except asyncio.CancelledError:
            return
        except GrpcError as e:
            self._finish(s, g.trailers_block(e.status, e.message))
            return
        except Exception as e:  # noqa: BLE001
            log.warning("gRPC handler failed: %r", e)
            self._finish(s, g.trailers_block(g.INTERNAL, type(e).__name__))
            return
        self._finish(s, g.TRAILERS_OK)

    # -- calls out -----------------------------------------------------------------------
    def send_message(self, s: GrpcStream, raw: bytes, flush: bool = True) -> None:
        if s.closed:
            return
        head = b""
        if not s.headers_sent:
            s.headers_sent = True
            head = g.RESPONSE_HEADERS
        self.conn.send_data(s.sid, b"\x00" + len(raw).to_bytes(4, "big") + raw, head)  # grpc.encode_message
        if flush:
            self._schedule_flush()

    def _finish(self, s: GrpcStream, trailers: bytes) -> None:
        """Send the status; a call that never wrote gets a trailers-only response."""
        if s.closed:
            return
        s.closed = True
        if self.calls.get(s.sid) is s:
            del self.calls[s.sid]
        self.conn.end_stream(s.sid, trailers if s.headers_sent else g.RESPONSE_HEADERS + trailers)
        self._schedule_flush()

    def _fail(self, s: GrpcStream, status: int, message: str) -> None:
        log.warning("gRPC stream %d failed: %s", s.sid, message)
        self.calls.pop(s.sid, None)
        self._cancel(s)
        block = (b"" if s.headers_sent else g.RESPONSE_HEADERS) + g.trailers_block(status, message)
        self.conn.end_stream(s.sid, block, abort=True)
        self._schedule_flush()

    def _cancel(self, s: GrpcStream) -> None:
        s.closed = True
        if s.task is not None and not s.task.done():
            s.task.cancel()

    def _cancel_all(self) -> None:
        calls, self.calls = self.calls, {}
        for s in calls.values():
            self._cancel(s)

    # -- output and timers ---------------------------------------------------------------
    def _schedule_flush(self) -> None:
        # Output made while events are dispatched leaves in one send at the end of
        # data_received. A handler's write goes out at once when it is alone, and at the
        # next loop iteration, in one send with the others', when the last read woke
        # several calls: one syscall per burst instead of one per call, without an extra
        # loop iteration per call at low concurrency (that measured ~30% more CPU).
        if self._receiving:
            return
        if self._batch > 1:
            if self._flush_handle is None:
                self._flush_handle = self.loop.call_soon(self._flush)
        else:
            self._flush()

    def _flush(self) -> None:
        self._flush_handle = None
        conn = self.conn
        t = self.transport
        if t is None or t.is_closing():
            return
        if conn.out.buf:
            t.write(conn.out.take())
        if (conn.closed or conn.goaway_sent or conn.peer_goaway) and conn.should_close:
            self._cancel_all()
            t.close()

    def _arm_timer(self, deadline: float | None) -> None:
        if deadline is not None:
            self._timer = self.loop.call_later(max(deadline - time.monotonic(), 0.01), self._tick)

    def _tick(self) -> None:
        self._arm_timer(self.conn.check_timeouts(time.monotonic()))
        if self.conn.closed:
            self._flush()

    def shutdown(self) -> None:
        """Stop taking new calls; close once the running ones finish."""
        self.conn.shutdown()
        self._flush()


class GrpcServer:
    """Serves registered methods (``/package.Service/Method``) on one TCP listener, in
    cleartext (h2c, prior knowledge) or, with ``tls``, over TLS (ALPN h2)."""

    def __init__(self, limits: H2Limits | None = None, tls: ReloadingTls | None = None, reuse_port: bool = False) -> None:
        self.limits = limits or DEFAULT_LIMITS
        self.tls = tls
        self.reuse_port = reuse_port   # several processes serve one port (server.workers)
        self.methods: dict[str, Method] = {}
        self.connections: set[H2Protocol] = set()
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    def add_method(self, path: str, decode: Decoder, handler: Handler) -> None:
        self.methods[path] = Method(decode, handler)

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        tls = {} if self.tls is None else {"ssl": self.tls.listener, "ssl_handshake_timeout": self.limits.handshake_timeout}
        self._server = await loop.create_server(lambda: H2Protocol(self), host, port, reuse_address=True, backlog=1024,
                                                reuse_port=self.reuse_port or None, **tls)
        if self.tls is not None:
            self.tls.start()
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self, grace: float) -> None:
        if self._server is not None:
            self._server.close()
        if self.tls is not None:
            await self.tls.stop()
        for c in list(self.connections):
            c.shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while any(c.calls for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for c in list(self.connections):
            if c.transport:
                c.transport.close()
