"""gRPC over HTTP/2, the message layer (sans-IO): length-prefixed messages in and out,
and the status trailers. See https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md."""

from __future__ import annotations

from urllib.parse import quote

from .h2.frames import U32
from .h2.headers import literal

OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND = 0, 1, 2, 3, 4, 5
RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 8, 12, 13, 14

# :status 200 (static index 8) and content-type: application/grpc.
RESPONSE_HEADERS = b"\x88" + literal(b"content-type", b"application/grpc")


def trailers_block(status: int, message: str = "") -> bytes:
    b = literal(b"grpc-status", str(status).encode())
    if message:
        b += literal(b"grpc-message", quote(message, safe=" ").encode())
    return b


TRAILERS_OK = trailers_block(OK)


def encode_message(raw: bytes) -> bytes:
    return b"\x00" + U32.pack(len(raw)) + raw


class GrpcStatusError(Exception):
    """The call must end with this status (the connection is fine)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def whole_message(data: bytes, max_size: int) -> bytes | None:
    """``data`` is exactly one uncompressed message within the cap: its bytes (the common
    case, a message per DATA frame: sliced, never buffered), else None."""
    n = len(data) - 5
    if n >= 0 and data[0] == 0 and n <= max_size and U32.unpack_from(data, 1)[0] == n:
        return data[5:]
    return None


class MessageReader:
    """Splits one stream's request bytes into messages (whole, uncompressed, capped)."""

    __slots__ = ("buf", "max_size")

    def __init__(self, max_size: int) -> None:
        self.buf = bytearray()
        self.max_size = max_size

    def feed(self, data: bytes) -> list[bytes]:
        """The messages completed by ``data`` (raw, without their 5-byte prefix)."""
        buf = self.buf
        if not buf:
            raw = whole_message(data, self.max_size)
            if raw is not None:
                return [raw]
        out = []
        buf += data
        while len(buf) >= 5:
            if buf[0] != 0:
                raise GrpcStatusError(UNIMPLEMENTED, "compressed messages are not supported")
            mlen = U32.unpack_from(buf, 1)[0]
            if mlen > self.max_size:
                raise GrpcStatusError(RESOURCE_EXHAUSTED, f"message of {mlen} bytes exceeds {self.max_size}")
            if len(buf) < 5 + mlen:
                break
            out.append(bytes(buf[5:5 + mlen]))
            del buf[:5 + mlen]
        return out

    @property
    def missing(self) -> int:
        """Bytes still needed to complete the message being received (0: none started)."""
        n = len(self.buf)
        if n == 0:
            return 0
        if n < 5:
            return 5 - n
        return 5 + U32.unpack_from(self.buf, 1)[0] - n

    def finish(self) -> None:
        """The client ended its side: a message cut short is an error, not a silent OK."""
        if self.buf:
            n = len(self.buf)
            want = 5 + U32.unpack_from(self.buf, 1)[0] if n >= 5 else 5
            raise GrpcStatusError(INTERNAL, f"incomplete message: {n} of {want} bytes before END_STREAM")
