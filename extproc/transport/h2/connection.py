"""The HTTP/2 server connection as a sans-IO state machine: bytes in, events out
(``receive_data``), frames to send (``data_to_send``), and the application's calls
(``send_data``, ``end_stream``, ``acknowledge``, ...). No sockets, no event loop, no
clock of its own (``clock`` is injected), so every rule is testable with plain bytes.

Scope: cleartext HTTP/2 with prior knowledge, server side, as Envoy's gRPC client speaks
it. Every limit comes from ``H2Limits``; a protocol error closes this connection with
GOAWAY and the right code and never raises to the caller.
"""

from __future__ import annotations

import time
from typing import Callable

from . import events as ev
from .flow import RecvWindow
from .frame_handlers import FrameHandlers, StreamState
from .frames import (E_NO_ERROR, E_PROTOCOL_ERROR, F_END_HEADERS, HEADERS, S_INITIAL_WINDOW_SIZE,
                     S_MAX_CONCURRENT_STREAMS, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE, ConnectionProtocolError,
                     EnhanceYourCalm, StreamError, frame, goaway, rst_stream, settings_frame, window_update)
from .guards import RateLimit
from .headers import HeaderDecoder
from .outbound import Outbound
from .reader import FrameReader
from ..limits import DEFAULT_LIMITS, H2Limits


class H2ServerConnection(FrameHandlers):
    def __init__(self, limits: H2Limits = DEFAULT_LIMITS, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self.out = Outbound(self._end_sent)
        self.recv = RecvWindow(limits.connection_window)
        self.headers = HeaderDecoder(limits.max_header_list_size)
        self.streams: dict[int, StreamState] = {}
        self.reader = FrameReader(limits.max_frame_size)
        self.cont: tuple[int, int, bytearray] | None = None  # (sid, flags, block) awaiting CONTINUATION
        self.last_sid = 0
        self.closed = False        # a GOAWAY with an error went out: nothing more is read
        self.goaway_sent = False   # graceful shutdown: no new streams
        self.peer_goaway = False
        self.resets = RateLimit(limits.max_resets_per_second)
        self.pings = RateLimit(limits.max_pings_per_second)
        self.settings_rate = RateLimit(limits.max_settings_per_second)
        self.created = self.idle_since = clock()
        self._stream_ceiling = limits.stream_window + limits.max_message_size + 5

    # -- the application's side --------------------------------------------------------
    def initiate(self) -> None:
        """Our SETTINGS and the connection window: the first bytes a server sends."""
        lim = self.limits
        self.out.buf.append(settings_frame({
            S_MAX_CONCURRENT_STREAMS: lim.max_concurrent_streams, S_INITIAL_WINDOW_SIZE: lim.stream_window,
            S_MAX_FRAME_SIZE: lim.max_frame_size, S_MAX_HEADER_LIST_SIZE: lim.max_header_list_size}))
        if lim.connection_window > 65535:
            self.out.buf.append(window_update(0, lim.connection_window - 65535))

    def data_to_send(self) -> bytes:
        return self.out.take() if self.out.buf else b""

    @property
    def should_close(self) -> bool:
        """Closed, or going away (either side) with no stream left."""
        return self.closed or ((self.goaway_sent or self.peer_goaway) and not self.streams)

    def send_data(self, sid: int, payload: bytes, head: bytes = b"") -> None:
        """DATA for ``sid`` as flow control allows; ``head`` is a header block sent first."""
        st = self.streams.get(sid)
        if st is None or st.ending:
            return
        st.answered = True
        self.out.data(st, payload, frame(HEADERS, F_END_HEADERS, sid, head) if head else b"")

    def end_stream(self, sid: int, block: bytes, abort: bool = False) -> None:
        """Trailers (END_STREAM) after the data already queued, or at once dropping it (``abort``)."""
        st = self.streams.get(sid)
        if st is None or st.ending:
            return
        st.ending = st.answered = True
        if abort:
            self.out.drop(st)
        if self.out.end(st, block):
            self._end_sent(st)

    def reset_stream(self, sid: int, code: int) -> None:
        st = self.streams.get(sid)
        if st is not None:
            self.out.buf.append(rst_stream(sid, code))
            self._remove(st)

    def acknowledge(self, sid: int, n: int) -> None:
        """The application consumed ``n`` bytes of ``sid``: window may go back to the peer."""
        st = self.streams.get(sid)
        if st is None:
            return  # its bytes were released when the stream went away
        r = st
        if n <= r.held and r.limit == r.initial and r.unreturned + n < r.initial >> 1:
            r.held -= n  # the hot path of RecvWindow.release, inlined: nothing to send yet
            r.unreturned += n
        else:
            inc = r.release(n)
            if inc and not st.remote_closed:
                self.out.buf.append(window_update(sid, inc))
        r = self.recv
        if n <= r.held and r.unreturned + n < r.initial >> 1:
            r.held -= n
            r.unreturned += n
        else:
            self._release_conn(n)

    def expect(self, sid: int, n: int) -> None:
        """A message on ``sid`` needs ``n`` more bytes to complete: make room if the limits allow."""
        st = self.streams.get(sid)
        if st is None or st.remote_closed:
            return
        inc = st.widen(n)
        if inc:
            self.out.buf.append(window_update(sid, inc))
        if self.recv.available < n:
            inc = self.recv.flush()  # never beyond the connection window: only what is due
            if inc:
                self.out.buf.append(window_update(0, inc))

    def shutdown(self) -> None:
        """Graceful GOAWAY: running streams finish, new ones are refused."""
        if not self.goaway_sent and not self.closed:
            self.goaway_sent = True
            self.out.buf.append(goaway(self.last_sid, E_NO_ERROR))

    def close(self, code: int, message: str) -> None:
        self._terminate(code, message, [])

    def check_timeouts(self, now: float) -> float | None:
        """Close the connection if its handshake or idle time ran out; the next deadline to
        check at, or None once closed."""
        lim = self.limits
        if self.closed:
            return None
        if not self.reader.settings_seen:
            if now - self.created >= lim.handshake_timeout:
                self._terminate(E_PROTOCOL_ERROR, "handshake timeout", [])
                return None
            return self.created + lim.handshake_timeout
        if self.streams:
            return now + lim.idle_timeout
        if now - self.idle_since >= lim.idle_timeout:
            self._terminate(E_NO_ERROR, "idle timeout", [])
            return None
        return self.idle_since + lim.idle_timeout

    # -- bytes in ----------------------------------------------------------------------
    def receive_data(self, data: bytes) -> list:
        events: list = []
        if self.closed:
            return events
        reader = self.reader
        try:
            for ftype, flags, sid, payload in reader.feed(data):
                try:
                    if self.cont is not None:
                        self._frame(ftype, flags, sid, payload, events)
                    elif ftype == 0:  # DATA and plain HEADERS, the hot path, skip the dispatch
                        self._data(flags, sid, payload, events)
                    elif ftype == 1 and flags & 0x2C == 0x4 and sid:  # END_HEADERS, no padding or priority
                        self._header_block(sid, flags, payload, events)
                    elif ftype == 3:  # RST_STREAM: Envoy ends every ext_proc stream with one
                        self._rst_stream(sid, payload, events)
                    else:
                        self._frame(ftype, flags, sid, payload, events)
                except StreamError as e:
                    self._stream_error(e, events)
            if reader.error is not None:
                raise reader.error
        except ConnectionProtocolError as e:
            self._terminate(e.code, str(e), events)
        return events

    # -- internals ---------------------------------------------------------------------
    def _count_reset(self) -> None:
        if self.resets.hit(self.clock()):
            raise EnhanceYourCalm("too many stream resets")

    def _stream_error(self, e: StreamError, events: list) -> None:
        self.out.buf.append(rst_stream(e.sid, e.code))
        st = self.streams.get(e.sid)
        if st is not None:
            self._remove(st)
            events.append((ev.RESET, e.sid, e.code))
        self._count_reset()

    def _end_sent(self, st: StreamState) -> None:
        if not st.remote_closed:  # we are done but the client is not: tell it to stop sending
            self.out.buf.append(rst_stream(st.sid, E_NO_ERROR))
        self._remove(st)

    def _remove(self, st: StreamState) -> None:
        if self.streams.pop(st.sid, None) is None:
            return
        if st.pending is not None:
            self.out.drop(st)
        if st.held:
            self._release_conn(st.held)  # its unread bytes are freed with it
        if not self.streams:
            self.idle_since = self.clock()

    def _terminate(self, code: int, message: str, events: list) -> None:
        if self.closed:
            return
        self.closed = True
        self.out.buf.append(goaway(self.last_sid, code, message))
        self.streams.clear()
        self.out.blocked.clear()
        self.cont = None
        events.append((ev.CLOSED, code, message))
