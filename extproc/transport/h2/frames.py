"""HTTP/2 framing (RFC 9113 section 4 and 6): constants, frame encoding, the typed errors,
and the per-frame-type payload checks. Pure functions on bytes; no state."""

from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
# flags
F_END_STREAM, F_ACK, F_END_HEADERS, F_PADDED, F_PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
# settings
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS, S_INITIAL_WINDOW_SIZE = 1, 2, 3, 4
S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 5, 6
# error codes
(E_NO_ERROR, E_PROTOCOL_ERROR, E_INTERNAL_ERROR, E_FLOW_CONTROL_ERROR, E_SETTINGS_TIMEOUT, E_STREAM_CLOSED,
 E_FRAME_SIZE_ERROR, E_REFUSED_STREAM, E_CANCEL, E_COMPRESSION_ERROR, E_CONNECT_ERROR,
 E_ENHANCE_YOUR_CALM) = range(12)

MIN_FRAME_SIZE, MAX_FRAME_SIZE = 1 << 14, (1 << 24) - 1
MAX_WINDOW = 2**31 - 1

HDR = struct.Struct(">HBBBI")  # 24-bit length as 16+8, type, flags, stream id
U32 = struct.Struct(">I")
SETTING = struct.Struct(">HI")


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return HDR.pack(n >> 8, n & 0xFF, ftype, flags, sid) + payload


def settings_frame(values: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(SETTING.pack(k, v) for k, v in values.items()))


def window_update(sid: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, sid, U32.pack(increment))


def rst_stream(sid: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, sid, U32.pack(code))


def goaway(last_sid: int, code: int, why: str = "") -> bytes:
    return frame(GOAWAY, 0, 0, U32.pack(last_sid) + U32.pack(code) + why.encode()[:200])


# -- errors --------------------------------------------------------------------------------
class H2Error(Exception):
    """An HTTP/2 error, carrying its RFC 9113 error code."""

    code = E_PROTOCOL_ERROR

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ConnectionProtocolError(H2Error):
    """A connection error: answered with GOAWAY and the connection is closed."""


class FrameSizeError(ConnectionProtocolError):
    code = E_FRAME_SIZE_ERROR


class FlowControlError(ConnectionProtocolError):
    code = E_FLOW_CONTROL_ERROR


class CompressionError(ConnectionProtocolError):
    code = E_COMPRESSION_ERROR


class EnhanceYourCalm(ConnectionProtocolError):
    """The peer is within the protocol but over a rate or size limit."""

    code = E_ENHANCE_YOUR_CALM


class StreamError(H2Error):
    """A stream error: answered with RST_STREAM on that stream; the connection goes on."""

    def __init__(self, sid: int, message: str, code: int = E_PROTOCOL_ERROR) -> None:
        super().__init__(message, code)
        self.sid = sid


# -- payload checks, one per frame type (RFC 9113 section 6) ---------------------------------
def strip_padding(flags: int, payload: bytes, what: str) -> tuple[int, int]:
    """(start, end) of the content of a DATA or HEADERS payload without its padding."""
    if not flags & F_PADDED:
        return 0, len(payload)
    if not payload:
        raise ConnectionProtocolError(f"padded {what} without a pad length")
    pad = payload[0]
    if pad >= len(payload):  # RFC 9113 6.1 / 6.2: padding must be shorter than the payload
        raise ConnectionProtocolError(f"{what} padding of {pad} exceeds its payload of {len(payload) - 1}")
    return 1, len(payload) - pad


def header_block_fragment(flags: int, sid: int, payload: bytes) -> bytes:
    start, end = strip_padding(flags, payload, "HEADERS")
    if flags & F_PRIORITY:
        if end - start < 5:
            raise FrameSizeError("HEADERS with PRIORITY shorter than 5 bytes")
        if U32.unpack_from(payload, start)[0] & 0x7FFFFFFF == sid:
            raise StreamError(sid, "stream depends on itself")
        start += 5
    return payload[start:end]


def check_priority(sid: int, payload: bytes) -> None:
    if sid == 0:
        raise ConnectionProtocolError("PRIORITY on stream 0")
    if len(payload) != 5:
        raise StreamError(sid, "PRIORITY frame length is not 5", E_FRAME_SIZE_ERROR)
    if U32.unpack_from(payload)[0] & 0x7FFFFFFF == sid:
        raise StreamError(sid, "stream depends on itself")


def rst_code(sid: int, payload: bytes) -> int:
    if sid == 0:
        raise ConnectionProtocolError("RST_STREAM on stream 0")
    if len(payload) != 4:
        raise FrameSizeError("RST_STREAM frame length is not 4")
    return U32.unpack(payload)[0]


def parse_settings(flags: int, sid: int, payload: bytes) -> list[tuple[int, int]]:
    if sid != 0:
        raise ConnectionProtocolError("SETTINGS on a stream")
    if flags & F_ACK:
        if payload:
            raise FrameSizeError("SETTINGS ACK with a payload")
        return []
    if len(payload) % 6:
        raise FrameSizeError("SETTINGS length is not a multiple of 6")
    out = []
    for i in range(0, len(payload), 6):
        k, v = SETTING.unpack_from(payload, i)
        if k == S_ENABLE_PUSH and v > 1:
            raise ConnectionProtocolError(f"SETTINGS_ENABLE_PUSH {v} is not 0 or 1")
        if k == S_INITIAL_WINDOW_SIZE and v > MAX_WINDOW:
            raise FlowControlError(f"SETTINGS_INITIAL_WINDOW_SIZE {v} exceeds 2^31-1")
        if k == S_MAX_FRAME_SIZE and not MIN_FRAME_SIZE <= v <= MAX_FRAME_SIZE:
            # A value of 0 once made the send loop emit empty DATA frames forever.
            raise ConnectionProtocolError(f"SETTINGS_MAX_FRAME_SIZE {v} out of range")
        out.append((k, v))
    return out


def check_ping(sid: int, payload: bytes) -> None:
    if sid != 0:
        raise ConnectionProtocolError("PING on a stream")
    if len(payload) != 8:
        raise FrameSizeError(f"PING frame length is {len(payload)}, not 8")


def window_increment(sid: int, payload: bytes) -> int:
    if len(payload) != 4:
        raise FrameSizeError(f"WINDOW_UPDATE frame length is {len(payload)}, not 4")
    inc = U32.unpack(payload)[0] & 0x7FFFFFFF
    if inc == 0:
        if sid == 0:
            raise ConnectionProtocolError("WINDOW_UPDATE with a zero increment")
        raise StreamError(sid, "WINDOW_UPDATE with a zero increment")
    return inc


def check_goaway(sid: int, payload: bytes) -> None:
    if sid != 0:
        raise ConnectionProtocolError("GOAWAY on a stream")
    if len(payload) < 8:
        raise FrameSizeError("GOAWAY shorter than 8 bytes")
