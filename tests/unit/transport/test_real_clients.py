"""The native gRPC/HTTP2 transport against real clients: grpcio's own client, and raw
frames for the corners grpcio never sends (padding, CONTINUATION, bad input)."""

import asyncio
import socket
import struct

import grpc
import hpack
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from health import health_ok

from extproc.transport import EOF, PREFACE, GrpcError, GrpcServer, frame

PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


class Echo:
    """Answers each message with a body response echoing the body's length; records ends."""

    def __init__(self):
        self.ended = []

    async def process(self, stream):
        try:
            while True:
                req = await stream.read()
                if req is EOF:
                    break
                n = len(req.request_body.body)
                await stream.write(pb.ProcessingResponse(request_body=pb.BodyResponse(
                    response=pb.CommonResponse(body_mutation=pb.BodyMutation(body=b"x" * n)))))
            self.ended.append("eof")
        except asyncio.CancelledError:
            self.ended.append("cancelled")
            raise

    async def check(self, stream):
        req = await stream.read()
        if req.service == "missing":
            raise GrpcError(5, "unknown service")
        await stream.write(health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING))


async def start():
    echo = Echo()
    srv = GrpcServer()
    srv.add_method(PROCESS, pb.ProcessingRequest.FromString, echo.process)
    srv.add_method("/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest.FromString, echo.check)
    port = await srv.start("127.0.0.1", 0)
    return srv, port, echo


def body(n: int) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=b"b" * n, end_of_stream=True))


@pytest.mark.asyncio
async def test_grpcio_client_streams_small_and_multi_megabyte_messages():
    srv, port, echo = await start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
                ("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]) as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)
            for sizes in ([10], [5 << 20, 3, 9 << 20]):  # big ones span many frames and windows
                call = stub.Process(iter([body(n) for n in sizes]))
                got = [len(r.request_body.response.body_mutation.body) async for r in call]
                assert got == sizes
                assert await call.code() == grpc.StatusCode.OK
            # Many concurrent streams on one connection.
            async def one(i):
                return [len(r.request_body.response.body_mutation.body) async for r in stub.Process(iter([body(i)]))]
            assert await asyncio.gather(*(one(i) for i in range(200))) == [[i] for i in range(200)]
    finally:
        await srv.stop(0.1)
    assert echo.ended.count("eof") == 202


@pytest.mark.asyncio
async def test_client_cancel_resets_the_stream_and_cancels_the_handler():
    srv, port, echo = await start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.ExternalProcessorStub(ch)
            call = stub.Process()
            await call.write(body(3))
            assert len((await call.read()).request_body.response.body_mutation.body) == 3
            call.cancel()
            for _ in range(50):
                if echo.ended:
                    break
                await asyncio.sleep(0.01)
    finally:
        await srv.stop(0.1)
    assert echo.ended == ["cancelled"]


@pytest.mark.asyncio
async def test_health_check_unknown_service_and_unknown_method():
    srv, port, echo = await start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            h = health_pb2_grpc.HealthStub(ch)
            r = await h.Check(health_pb2.HealthCheckRequest(service=""))
            assert r.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await h.Check(health_pb2.HealthCheckRequest(service="missing"))
            assert ei.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                async for _ in h.Watch(health_pb2.HealthCheckRequest(service="")):
                    pass
            assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await srv.stop(0.1)


def _read_frames(sock: socket.socket, want_end_stream: int, timeout=3.0, max_frames=100_000):
    """Frames until END_STREAM on ``want_end_stream``, the peer closes, ``max_frames`` or
    ``timeout`` seconds in all (a server stuck sending frames must not hang the test)."""
    import time

    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    buf = b""
    frames = []
    while len(frames) < max_frames and time.monotonic() < deadline:
        while len(buf) >= 9:
            n = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + n:
                break
            ftype, flags, sid = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            frames.append((ftype, flags, sid, buf[9:9 + n]))
            buf = buf[9 + n:]
            if ftype == 1 and sid == want_end_stream and flags & 0x1:
                return frames
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return frames
        if not chunk:
            return frames
        buf += chunk
    return frames


@pytest.mark.asyncio
async def test_raw_frames_padding_continuation_and_ping():
    srv, port, echo = await start()
    loop = asyncio.get_running_loop()

    def client():
        enc = hpack.Encoder()
        block = enc.encode([(":method", "POST"), (":scheme", "http"), (":path", PROCESS),
                            (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers")])
        msg = body(1000).SerializeToString()
        grpc_msg = b"\x00" + struct.pack(">I", len(msg)) + msg
        pad = 7
        padded_data = bytes([pad]) + grpc_msg[:500] + b"\x00" * pad
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(PREFACE + frame(4, 0, 0)
                  + frame(1, 0x0, 1, block[:5])              # HEADERS without END_HEADERS
                  + frame(9, 0x4, 1, block[5:])              # CONTINUATION with END_HEADERS
                  + frame(6, 0, 0, b"12345678")              # PING
                  + frame(0, 0x8, 1, padded_data)            # padded DATA, first half of the message
                  + frame(0, 0x1, 1, grpc_msg[500:]))        # rest, END_STREAM
        frames = _read_frames(s, want_end_stream=1)
        s.close()
        return frames

    try:
        frames = await loop.run_in_executor(None, client)
    finally:
        await srv.stop(0.1)
    kinds = [(f[0], f[2]) for f in frames]
    assert (6, 0) in kinds  # PING answered
    assert any(f[0] == 6 and f[1] & 1 and f[3] == b"12345678" for f in frames)
    data = b"".join(f[3] for f in frames if f[0] == 0 and f[2] == 1)
    resp = pb.ProcessingResponse.FromString(data[5:])
    assert len(resp.request_body.response.body_mutation.body) == 1000
    trailers = hpack.Decoder().decode([f for f in frames if f[0] == 1 and f[2] == 1][-1][3])
    assert ("grpc-status", "0") in trailers
    assert echo.ended == ["eof"]


@pytest.mark.asyncio
async def test_garbage_is_refused_without_hurting_the_server():
    srv, port, echo = await start()
    loop = asyncio.get_running_loop()

    def client():
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\x00" * 64)
        s.settimeout(3)
        data = s.recv(4096)
        s.close()
        return data

    try:
        data = await loop.run_in_executor(None, client)
        assert data[3] == 4 or b"not an HTTP/2" in data  # our SETTINGS and/or GOAWAY, then closed
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:  # still serving
            r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert r.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await srv.stop(0.1)


@pytest.mark.asyncio
async def test_header_block_cache_follows_hpack_table_changes():
    """Repeated blocks skip HPACK decoding; a block that changes the table must not
    leave stale entries behind (index numbers shift, so old bytes mean other headers)."""
    srv, port, echo = await start()
    loop = asyncio.get_running_loop()
    base = [(":method", "POST"), (":scheme", "http"), (":authority", "x"), ("content-type", "application/grpc")]

    def client():
        enc = hpack.Encoder()
        msg = body(1).SerializeToString()
        data = b"\x00" + struct.pack(">I", len(msg)) + msg
        out = PREFACE + frame(4, 0, 0)
        paths = [PROCESS, PROCESS, PROCESS, "/no.Such/Method", "/other.Unknown/Call", PROCESS, PROCESS]
        for i, p in enumerate(paths):
            sid = 2 * i + 1
            out += frame(1, 0x4, sid, enc.encode(base + [(":path", p)])) + frame(0, 0x1, sid, data)
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(out)
        frames = _read_frames(s, want_end_stream=2 * len(paths) - 1)
        s.close()
        dec = hpack.Decoder()
        status = {}
        for ftype, flags, sid, payload in frames:
            if ftype == 1:
                for k, v in dec.decode(payload):
                    if k == "grpc-status":
                        status[sid] = v
        return [status.get(2 * i + 1) for i in range(len(paths))]

    try:
        got = await loop.run_in_executor(None, client)
    finally:
        await srv.stop(0.1)
    assert got == ["0", "0", "0", "12", "12", "0", "0"]


@pytest.mark.asyncio
async def test_a_response_held_back_by_flow_control_arrives_intact():
    """Large answers are split by the client's window; the held-back remainder must be
    sent as data whatever its first byte (it once could be mistaken for queued trailers)."""
    payload = b"T" * (3 << 20)

    async def handler(stream):
        while (await stream.read()) is not EOF:
            await stream.write(pb.ProcessingResponse(request_body=pb.BodyResponse(
                response=pb.CommonResponse(body_mutation=pb.BodyMutation(body=payload)))))

    srv = GrpcServer()
    srv.add_method(PROCESS, pb.ProcessingRequest.FromString, handler)
    port = await srv.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[
                ("grpc.max_receive_message_length", 64 << 20), ("grpc.http2.bdp_probe", 0)]) as ch:
            call = pb_grpc.ExternalProcessorStub(ch).Process(iter([body(1), body(2)]))
            got = [r.request_body.response.body_mutation.body async for r in call]
            assert await call.code() == grpc.StatusCode.OK
    finally:
        await srv.stop(0.1)
    assert got == [payload, payload]


def _serve_in_thread():
    """The server on its own event loop in a daemon thread, so a server that wedges its
    loop fails the test (the client times out) instead of hanging the test run."""
    import threading

    ready = threading.Event()
    box = {}

    def run():
        loop = asyncio.new_event_loop()
        box["loop"] = loop

        async def main():
            srv, port, echo = await start()
            box["srv"], box["port"] = srv, port
            ready.set()
            await asyncio.Event().wait()

        try:
            loop.run_until_complete(main())
        except RuntimeError:
            pass  # loop stopped by the test

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(5)
    return box



def test_settings_max_frame_size_zero_is_a_protocol_error_not_a_wedged_server():
    """Regression: SETTINGS_MAX_FRAME_SIZE=0 (RFC 9113 requires 2^14..2^24-1) once made the
    flush loop send empty DATA frames forever, so no decision was ever made again."""
    box = _serve_in_thread()
    port = box["port"]
    enc = hpack.Encoder()
    block = enc.encode([(":method", "POST"), (":scheme", "http"), (":path", PROCESS),
                        (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers")])
    msg = body(100).SerializeToString()
    s = socket.create_connection(("127.0.0.1", port))
    # The bad SETTINGS, then a call whose answer must be sent under the bad frame size.
    s.sendall(PREFACE + frame(4, 0, 0, struct.pack(">HI", 5, 0))
              + frame(1, 0x4, 1, block) + frame(0, 0x1, 1, b"\x00" + struct.pack(">I", len(msg)) + msg))
    frames = _read_frames(s, want_end_stream=-1, timeout=3.0)
    s.close()
    goaway = [f for f in frames if f[0] == 7]
    assert goaway, f"no GOAWAY, got frame types {[f[0] for f in frames]}"
    assert int.from_bytes(goaway[0][3][4:8], "big") == 0x1  # PROTOCOL_ERROR
    assert not any(f[0] == 0 and not f[3] for f in frames)  # no empty DATA frames
    # The server still answers on another connection, promptly.
    assert health_ok(port, timeout=2.0)
    # Out-of-range the other way (> 2^24-1) is refused too.
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(PREFACE + frame(4, 0, 0, struct.pack(">HI", 5, 1 << 24)))
    frames = _read_frames(s, want_end_stream=-1, timeout=3.0)
    s.close()
    assert any(f[0] == 7 and int.from_bytes(f[3][4:8], "big") == 0x1 for f in frames)
    assert health_ok(port, timeout=2.0)
    box["loop"].call_soon_threadsafe(box["loop"].stop)
