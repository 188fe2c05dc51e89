"""Frames out: the output buffer, the peer's send windows and frame size, and the data
(and trailers behind it) that flow control holds back."""

from __future__ import annotations

import collections
from typing import Callable, Protocol

from .frames import (DATA, F_END_HEADERS, F_END_STREAM, HEADERS, MAX_WINDOW, FlowControlError, StreamError,
                     E_FLOW_CONTROL_ERROR, frame)


class SendState(Protocol):
    """A stream's sending side: its window and what waits for window, in order."""

    sid: int
    send_window: int
    pending: "collections.deque[tuple[bool, bytes]] | None"  # (is_trailers, bytes), None when empty


class Outbound:
    __slots__ = ("buf", "window", "initial_window", "max_frame", "blocked", "on_end_sent")

    def __init__(self, on_end_sent: Callable[[SendState], None]) -> None:
        self.buf: list[bytes] = []
        self.window = 65535          # the peer's connection window for our DATA
        self.initial_window = 65535  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self.max_frame = 16384       # the peer's SETTINGS_MAX_FRAME_SIZE
        self.blocked: dict[int, SendState] = {}  # streams with output waiting for window
        self.on_end_sent = on_end_sent  # called once a stream's trailers went out

    def take(self) -> bytes:
        buf = self.buf
        data = buf[0] if len(buf) == 1 else b"".join(buf)
        buf.clear()
        return data

    def data(self, st: SendState, payload: bytes, head: bytes = b"") -> None:
        """Send ``payload`` as DATA (after ``head``, already framed) as windows allow."""
        n = len(payload)
        if not st.pending and n <= self.window and n <= st.send_window and n <= self.max_frame:
            self.window -= n
            st.send_window -= n
            self.buf.append(head + frame(DATA, 0, st.sid, payload))
            return
        if head:
            self.buf.append(head)
        if st.pending is None:
            st.pending = collections.deque()
        st.pending.append((False, payload))
        self.blocked[st.sid] = st
        self.flush()

    def end(self, st: SendState, block: bytes) -> bool:
        """Trailers (END_STREAM) after the data ahead of them; True if sent now."""
        if st.pending:
            st.pending.append((True, block))
            return False
        self.buf.append(frame(HEADERS, F_END_HEADERS | F_END_STREAM, st.sid, block))
        return True

    def drop(self, st: SendState) -> None:
        st.pending = None
        self.blocked.pop(st.sid, None)

    def window_update(self, st: SendState | None, inc: int) -> None:
        if st is None:
            self.window += inc
            if self.window > MAX_WINDOW:
                raise FlowControlError("connection send window overflows 2^31-1")
        else:
            st.send_window += inc
            if st.send_window > MAX_WINDOW:
                raise StreamError(st.sid, "stream send window overflows 2^31-1", E_FLOW_CONTROL_ERROR)
        self.flush()

    def set_initial_window(self, value: int, streams: "collections.abc.Iterable[SendState]") -> None:
        delta = value - self.initial_window
        self.initial_window = value
        for st in streams:
            st.send_window += delta
            if st.send_window > MAX_WINDOW:  # RFC 9113 6.9.2
                raise FlowControlError("SETTINGS_INITIAL_WINDOW_SIZE overflows a stream window")

    def flush(self) -> None:
        """Send what flow control held back; only streams with something waiting are
        visited, so a window update costs nothing for the thousands of idle streams."""
        for sid, st in list(self.blocked.items()):
            pending = st.pending
            while pending:
                is_trailers, item = pending[0]
                if is_trailers:
                    pending.popleft()
                    self.buf.append(frame(HEADERS, F_END_HEADERS | F_END_STREAM, sid, item))
                    self.on_end_sent(st)
                    break
                room = min(self.window, st.send_window)
                if room <= 0:
                    break
                chunk = item[:min(room, self.max_frame)]  # max_frame >= 2^14: always progresses
                self.window -= len(chunk)
                st.send_window -= len(chunk)
                self.buf.append(frame(DATA, 0, sid, chunk))
                if len(chunk) == len(item):
                    pending.popleft()
                else:
                    pending[0] = (False, item[len(chunk):])
            if not st.pending:
                self.blocked.pop(sid, None)
