"""gRPC message framing (sans-IO) and what the asyncio adapter makes of it, with a fake
transport: statuses for truncated, oversize, compressed and unparsable messages, flow
control driven by the handler's reads, and no exception ever leaving data_received."""

import asyncio
import struct

import hpack
import pytest
from h2peer import DATA, GOAWAY, HEADERS, PROCESS, REQUEST_HEADERS, RST_STREAM, SETTINGS, grpc_message, parse_frames

from extproc.transport import EOF, GrpcServer, H2Limits
from extproc.transport import grpc as g
from extproc.transport.h2.frames import E_INTERNAL_ERROR, PREFACE, frame

U32 = struct.Struct(">I")


def test_whole_split_and_batched_messages():
    r = g.MessageReader(1000)
    assert r.feed(grpc_message(b"one")) == [b"one"]  # the one-frame fast path
    both = grpc_message(b"a") + grpc_message(b"bb")
    assert r.feed(both) == [b"a", b"bb"]
    m = grpc_message(b"x" * 100)
    assert r.feed(m[:3]) == [] and r.missing == 2
    assert r.feed(m[3:50]) == [] and r.missing == 55
    assert r.feed(m[50:] + grpc_message(b"")[:4]) == [b"x" * 100] and r.missing == 1
    assert r.feed(b"\x00") == [b""]
    r.finish()


def test_truncated_message_at_end_of_stream_is_an_error():
    r = g.MessageReader(1000)
    r.feed(grpc_message(b"abcdef")[:7])
    with pytest.raises(g.GrpcStatusError) as ei:
        r.finish()
    assert ei.value.status == g.INTERNAL and "incomplete message" in ei.value.message
    r = g.MessageReader(1000)
    r.feed(b"\x00\x00")
    with pytest.raises(g.GrpcStatusError):
        r.finish()


def test_oversize_is_refused_from_the_length_prefix_alone():
    r = g.MessageReader(1000)
    with pytest.raises(g.GrpcStatusError) as ei:
        r.feed(b"\x00" + U32.pack(1001))
    assert ei.value.status == g.RESOURCE_EXHAUSTED
    with pytest.raises(g.GrpcStatusError):  # also on the fast path
        g.MessageReader(3).feed(grpc_message(b"abcd"))


def test_compressed_messages_are_unimplemented():
    with pytest.raises(g.GrpcStatusError) as ei:
        g.MessageReader(1000).feed(b"\x01" + U32.pack(1) + b"x")
    assert ei.value.status == g.UNIMPLEMENTED


def test_trailers_block_percent_encodes_the_message():
    from urllib.parse import unquote

    dec = hpack.Decoder()
    (k1, v1), (k2, v2) = dec.decode(g.trailers_block(13, "bad: 100%\n"))
    assert (k1, v1, k2) == ("grpc-status", "13", "grpc-message")
    assert "%25%0A" in v2 and unquote(v2) == "bad: 100%\n"
    assert dec.decode(g.RESPONSE_HEADERS) == [(":status", "200"), ("content-type", "application/grpc")]


# -- through the asyncio adapter, with a fake transport ------------------------------------
class FakeTransport:
    def __init__(self):
        self.out = bytearray()
        self.closed = False

    def write(self, data):
        self.out += data

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def frames(self):
        f = parse_frames(bytes(self.out))
        self.out.clear()
        return f


class Harness:
    def __init__(self, handler, **limits):
        self.srv = GrpcServer(H2Limits(**limits) if limits else None)
        self.srv.add_method(PROCESS, lambda b: b, handler)
        from extproc.transport.server import H2Protocol

        self.proto = H2Protocol(self.srv)
        self.t = FakeTransport()
        self.proto.connection_made(self.t)
        self.enc = hpack.Encoder()
        self.proto.data_received(PREFACE + frame(SETTINGS, 0, 0))
        self.t.frames()

    def open(self, sid, path=PROCESS):
        self.proto.data_received(frame(HEADERS, 0x4, sid, self.enc.encode(
            [(k, v if k != ":path" else path) for k, v in REQUEST_HEADERS])))

    def status(self, frames, sid):
        dec = hpack.Decoder()
        st = None
        for f in frames:
            if f[0] == HEADERS and f[2] == sid:
                st = dict(dec.decode(f[3])).get("grpc-status", st)
        return st


async def echo(stream):
    while (m := await stream.read()) is not EOF:
        await stream.write(_Raw(m))


class _Raw:
    def __init__(self, b):
        self.b = b

    def SerializeToString(self):  # noqa: N802
        return self.b


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_truncated_message_then_end_stream_is_internal_not_ok():
    h = Harness(echo)
    h.open(1)
    h.proto.data_received(frame(DATA, 0x1, 1, grpc_message(b"hello")[:6]))
    await settle()
    frames = h.t.frames()
    assert h.status(frames, 1) == str(g.INTERNAL)
    assert not h.proto.calls


@pytest.mark.asyncio
async def test_oversize_message_is_resource_exhausted_and_the_connection_lives():
    h = Harness(echo, max_message_size=100, connection_window=1 << 20)
    h.open(1)
    h.proto.data_received(frame(DATA, 0, 1, b"\x00" + U32.pack(10_000_000)))
    await settle()
    frames = h.t.frames()
    assert h.status(frames, 1) == str(g.RESOURCE_EXHAUSTED)
    assert any(f[0] == RST_STREAM and f[2] == 1 for f in frames)
    h.open(3)
    h.proto.data_received(frame(DATA, 0x1, 3, grpc_message(b"ok")))
    await settle()
    frames = h.t.frames()
    assert h.status(frames, 3) == "0" and b"ok" in b"".join(f[3] for f in frames if f[0] == DATA)


@pytest.mark.asyncio
async def test_unparsable_message_is_internal():
    def bad(raw):
        raise ValueError("nope")

    h = Harness(echo)
    h.srv.methods[PROCESS].decode = bad
    h.open(1)
    h.proto.data_received(frame(DATA, 0x1, 1, grpc_message(b"x")))
    await settle()
    assert h.status(h.t.frames(), 1) == str(g.INTERNAL)


@pytest.mark.asyncio
async def test_unknown_method_is_unimplemented():
    h = Harness(echo)
    h.open(1, path="/no/Such")
    assert h.status(h.t.frames(), 1) == str(g.UNIMPLEMENTED)


@pytest.mark.asyncio
async def test_window_goes_back_only_when_the_handler_reads():
    gate = asyncio.Event()

    async def slow(stream):
        await gate.wait()
        while (await stream.read()) is not EOF:
            pass

    h = Harness(slow, stream_window=1000, connection_window=1 << 20, max_message_size=500)
    h.open(1)
    for _ in range(3):
        h.proto.data_received(frame(DATA, 0, 1, grpc_message(b"x" * 295)))
    await settle()
    assert not [f for f in h.t.frames() if f[0] == 8]  # no WINDOW_UPDATE while unread
    assert h.proto.conn.streams[1].held == 900
    h.proto.data_received(frame(DATA, 0, 1, grpc_message(b"x" * 200)))  # over the stream window
    frames = h.t.frames()
    assert any(f[0] == RST_STREAM and f[2] == 1 for f in frames)
    assert 1 not in h.proto.calls  # handler cancelled
    h.open(3)
    gate.set()
    h.proto.data_received(frame(DATA, 0, 3, grpc_message(b"y" * 495)))
    await settle()
    assert [f for f in h.t.frames() if f[0] == 8 and f[2] == 3]  # read: window back


@pytest.mark.asyncio
async def test_client_reset_cancels_the_handler():
    ended = []

    async def waits(stream):
        try:
            await stream.read()
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise

    h = Harness(waits)
    h.open(1)
    await settle()
    h.proto.data_received(frame(RST_STREAM, 0, 1, U32.pack(8)))
    await settle()
    assert ended == ["cancelled"] and not h.proto.calls


@pytest.mark.asyncio
async def test_a_bug_in_the_stack_closes_the_connection_and_never_raises(monkeypatch):
    h = Harness(echo)

    def boom(data):
        raise RuntimeError("bug")

    monkeypatch.setattr(h.proto.conn, "receive_data", boom)
    h.proto.data_received(b"anything")  # must not raise
    frames = h.t.frames()
    assert [f for f in frames if f[0] == GOAWAY and U32.unpack(f[3][4:8])[0] == E_INTERNAL_ERROR]
    assert h.t.closed


@pytest.mark.asyncio
async def test_protocol_error_closes_and_cancels_every_call():
    h = Harness(echo)
    h.open(1)
    await settle()
    h.proto.data_received(frame(6, 0, 0, b""))  # a 0-byte PING
    assert h.t.closed and not h.proto.calls
