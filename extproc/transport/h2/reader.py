"""Splitting the inbound byte stream into frames: the client preface, then 9-byte frame
headers and their payloads. A frame over our SETTINGS_MAX_FRAME_SIZE is refused from its
header, before its payload is buffered; at most one partial frame is ever kept."""

from __future__ import annotations

from .frames import HDR, PREFACE, SETTINGS, ConnectionProtocolError, FrameSizeError

Frame = tuple[int, int, int, bytes]  # type, flags, stream id, payload


class FrameReader:
    __slots__ = ("max_frame", "buf", "need", "preface_ok", "settings_seen", "error")

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self.buf = bytearray()
        self.need = 0                 # bytes the buffered partial frame needs before parsing is worth it
        self.preface_ok = False
        self.settings_seen = False    # the client's first SETTINGS: the handshake is done
        self.error: ConnectionProtocolError | None = None  # what stopped the stream of frames

    def feed(self, data: bytes) -> list[Frame]:
        """The frames completed by ``data``; on a framing error, those before it (and ``error`` set)."""
        frames: list[Frame] = []
        if self.error is not None:
            return frames
        if self.buf:
            self.buf += data
            if len(self.buf) < self.need:
                return frames  # a large frame still arriving: do not copy it again
            buf = bytes(self.buf)
        else:
            buf = data  # the common case: parse the bytes as they came, no copy
        pos = 0
        try:
            if not self.preface_ok:
                k = min(len(buf), len(PREFACE))
                if buf[:k] != PREFACE[:k]:
                    raise ConnectionProtocolError("not an HTTP/2 prior-knowledge client")
                if k < len(PREFACE):
                    self.buf = bytearray(buf)
                    return frames
                self.preface_ok = True
                pos = len(PREFACE)
            n = len(buf)
            max_frame = self.max_frame
            if not self.settings_seen and n - pos >= 9:
                if buf[pos + 3] != SETTINGS or buf[pos + 4] & 0x1:
                    raise ConnectionProtocolError("the client preface must start with SETTINGS")
                self.settings_seen = True
            unpack, append = HDR.unpack_from, frames.append
            while n - pos >= 9:
                hi, lo, ftype, flags, sid = unpack(buf, pos)
                length = hi << 8 | lo
                if length > max_frame:
                    raise FrameSizeError(f"frame of {length} bytes exceeds SETTINGS_MAX_FRAME_SIZE {max_frame}")
                end = pos + 9 + length
                if end > n:
                    self.need = end - pos
                    break
                append((ftype, flags, sid & 0x7FFFFFFF, buf[pos + 9:end]))
                pos = end
        except ConnectionProtocolError as e:
            self.error = e
            self.buf = bytearray()
            return frames
        if pos < n:
            self.buf = bytearray(buf[pos:])
            if n - pos < 9:
                self.need = 9
        elif self.buf:
            self.buf = bytearray()
        return frames
