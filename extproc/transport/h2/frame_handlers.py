"""The frame-type handlers of the server connection (RFC 9113 section 6), split from the
connection's state and application API only to keep each class small."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import events as ev
from .frames import (CONTINUATION, DATA, F_ACK, F_END_HEADERS, F_END_STREAM, GOAWAY, HEADERS, PING, PRIORITY,
                     PUSH_PROMISE, RST_STREAM, S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, SETTINGS, WINDOW_UPDATE,
                     F_PADDED, E_FLOW_CONTROL_ERROR, E_REFUSED_STREAM, E_STREAM_CLOSED, ConnectionProtocolError, EnhanceYourCalm, FlowControlError, StreamError,
                     check_goaway, check_ping, check_priority, frame, header_block_fragment, parse_settings,
                     rst_code, rst_stream, U32, strip_padding, window_increment, window_update)

from .flow import RecvWindow

if TYPE_CHECKING:
    from .connection import H2ServerConnection


class StreamState(RecvWindow):
    """A stream as the connection sees it: its receive window (it is one, to save an
    object per stream), its sending side (``outbound.SendState``) and who has finished."""

    __slots__ = ("sid", "send_window", "pending", "remote_closed", "ending", "answered")

    def __init__(self, sid: int, send_window: int, window: int, ceiling: int) -> None:
        self.initial = self.limit = self.available = window  # RecvWindow's fields, set here: a call less
        self.ceiling = ceiling  # >= window: the connection passes stream_window + one message
        self.held = self.unreturned = 0
        self.sid = sid
        self.send_window = send_window
        self.pending = None
        self.remote_closed = False
        self.ending = False  # our trailers are queued or sent
        self.answered = False  # we sent (or queued) response headers


class FrameHandlers:
    """Mixed into ``H2ServerConnection``; every method may raise a typed H2 error."""

    def _frame(self: "H2ServerConnection", ftype: int, flags: int, sid: int, payload: bytes, events: list) -> None:
        if self.cont is not None and ftype != CONTINUATION:
            raise ConnectionProtocolError("expected CONTINUATION")
        if ftype == DATA:
            self._data(flags, sid, payload, events)
        elif ftype == HEADERS:
            if sid == 0:
                raise ConnectionProtocolError("HEADERS on stream 0")
            block = header_block_fragment(flags, sid, payload) if flags & 0x28 else payload  # PADDED|PRIORITY
            if flags & F_END_HEADERS:
                self._header_block(sid, flags, block, events)
            else:
                if len(block) > self.limits.max_header_block:
                    raise EnhanceYourCalm(f"header block exceeds {self.limits.max_header_block} bytes")
                self.cont = (sid, flags, bytearray(block))
        elif ftype == CONTINUATION:
            self._continuation(flags, sid, payload, events)
        elif ftype == RST_STREAM:
            self._rst_stream(sid, payload, events)
        elif ftype == SETTINGS:
            self._settings(flags, sid, payload)
        elif ftype == WINDOW_UPDATE:
            self._window_update(sid, payload)
        elif ftype == PING:
            check_ping(sid, payload)
            if self.pings.hit(self.clock()):
                raise EnhanceYourCalm("too many PINGs")
            if not flags & F_ACK:
                self.out.buf.append(frame(PING, F_ACK, 0, payload))
        elif ftype == PRIORITY:
            check_priority(sid, payload)
        elif ftype == GOAWAY:
            check_goaway(sid, payload)
            self.peer_goaway = True
        elif ftype == PUSH_PROMISE:
            raise ConnectionProtocolError("PUSH_PROMISE from a client")
        # Unknown frame types are ignored, as RFC 9113 5.5 requires.

    def _data(self: "H2ServerConnection", flags: int, sid: int, payload: bytes, events: list) -> None:
        if sid == 0:
            raise ConnectionProtocolError("DATA on stream 0")
        n = len(payload)
        r = self.recv
        if n > r.available:
            raise FlowControlError("connection receive window exceeded")
        r.available -= n  # RecvWindow.receive, inlined (the hot path)
        r.held += n
        st = self.streams.get(sid)
        if st is None:
            if sid > self.last_sid:
                raise ConnectionProtocolError(f"DATA on idle stream {sid}")
            self._release_conn(n)  # a stream we closed: drop its data, keep the window going
            return
        if st.remote_closed:
            self._release_conn(n)
            raise StreamError(sid, "DATA after END_STREAM", E_STREAM_CLOSED)
        r = st
        if n > r.available:
            self._release_conn(n)
            raise StreamError(sid, "stream receive window exceeded", E_FLOW_CONTROL_ERROR)
        r.available -= n
        r.held += n
        if flags & F_PADDED:
            start, end = strip_padding(flags, payload, "DATA")
            self.acknowledge(sid, n - (end - start))  # padding is never buffered
            payload = payload[start:end]
        end_stream = flags & F_END_STREAM
        if end_stream:
            st.remote_closed = True
        events.append((ev.DATA, sid, payload, end_stream))

    def _continuation(self: "H2ServerConnection", flags: int, sid: int, payload: bytes, events: list) -> None:
        if self.cont is None or self.cont[0] != sid:
            raise ConnectionProtocolError("unexpected CONTINUATION")
        block = self.cont[2]
        block += payload
        if len(block) > self.limits.max_header_block:
            raise EnhanceYourCalm(f"header block exceeds {self.limits.max_header_block} bytes")
        if flags & F_END_HEADERS:
            csid, cflags, _ = self.cont
            self.cont = None
            self._header_block(csid, cflags, bytes(block), events)

    def _rst_stream(self: "H2ServerConnection", sid: int, payload: bytes, events: list) -> None:
        code = rst_code(sid, payload) if sid == 0 or len(payload) != 4 else U32.unpack(payload)[0]
        st = self.streams.get(sid)
        if st is None:
            if sid > self.last_sid:
                raise ConnectionProtocolError(f"RST_STREAM on idle stream {sid}")
            return
        self._remove(st)
        events.append((ev.RESET, sid, code))
        if not st.answered:
            # Envoy resets every ext_proc stream once it has our answer: that is normal.
            # A reset before any answer is what a rapid-reset flood is made of.
            self._count_reset()

    def _settings(self: "H2ServerConnection", flags: int, sid: int, payload: bytes) -> None:
        values = parse_settings(flags, sid, payload)
        if self.settings_rate.hit(self.clock()):
            raise EnhanceYourCalm("too many SETTINGS")
        if flags & F_ACK:
            return
        for k, v in values:
            if k == S_INITIAL_WINDOW_SIZE:
                self.out.set_initial_window(v, self.streams.values())
            elif k == S_MAX_FRAME_SIZE:
                self.out.max_frame = v
            # HEADER_TABLE_SIZE: we never index when encoding; the others do not concern a server.
        self.out.buf.append(frame(SETTINGS, F_ACK, 0))
        self.out.flush()

    def _window_update(self: "H2ServerConnection", sid: int, payload: bytes) -> None:
        inc = window_increment(sid, payload)
        if sid == 0:
            self.out.window_update(None, inc)
            return
        st = self.streams.get(sid)
        if st is None:
            if sid > self.last_sid:
                raise ConnectionProtocolError(f"WINDOW_UPDATE on idle stream {sid}")
            return
        self.out.window_update(st, inc)

    def _header_block(self: "H2ServerConnection", sid: int, flags: int, block: bytes, events: list) -> None:
        path = self.headers.path_of(block)  # always decoded: HPACK state is per connection
        st = self.streams.get(sid)
        if st is not None:  # trailers from the client end its side of the stream
            if st.remote_closed:
                raise StreamError(sid, "HEADERS after END_STREAM", E_STREAM_CLOSED)
            if not flags & F_END_STREAM:
                raise StreamError(sid, "trailers without END_STREAM")
            st.remote_closed = True
            events.append((ev.DATA, sid, b"", True))
            return
        if sid % 2 == 0:
            raise ConnectionProtocolError(f"client opened even stream {sid}")
        if sid <= self.last_sid:
            raise ConnectionProtocolError(f"HEADERS on closed stream {sid}", E_STREAM_CLOSED)
        self.last_sid = sid
        if self.goaway_sent:
            self.out.buf.append(rst_stream(sid, E_REFUSED_STREAM))
            return
        if len(self.streams) >= self.limits.max_concurrent_streams:
            self.out.buf.append(rst_stream(sid, E_REFUSED_STREAM))
            self._count_reset()  # refused streams cost us too: a flood of them is a reset flood
            return
        st = self.streams[sid] = StreamState(sid, self.out.initial_window, self.limits.stream_window,
                                             self._stream_ceiling)
        end_stream = flags & F_END_STREAM
        if end_stream:
            st.remote_closed = True
        events.append((ev.REQUEST, sid, path, end_stream))

    def _release_conn(self: "H2ServerConnection", n: int) -> None:
        inc = self.recv.release(n)
        if inc:
            self.out.buf.append(window_update(0, inc))
