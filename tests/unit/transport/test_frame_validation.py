"""Every frame-level rule of RFC 9113 the server enforces, driven with plain bytes."""

import struct

import pytest
from h2peer import (CONTINUATION, DATA, GOAWAY, HEADERS, PING, PRIORITY, PUSH_PROMISE, RST_STREAM, SETTINGS,
                    WINDOW_UPDATE, Peer, grpc_message, rsts)

from extproc.transport.h2 import events as ev
from extproc.transport.h2.frames import (E_COMPRESSION_ERROR, E_ENHANCE_YOUR_CALM, E_FLOW_CONTROL_ERROR,
                                         E_FRAME_SIZE_ERROR, E_PROTOCOL_ERROR, E_STREAM_CLOSED, PREFACE, frame)

U32 = struct.Struct(">I")


def test_bad_preface_is_refused_at_once():
    p = Peer(handshake=False)
    p.send(b"GET / HTTP/1.1\r\n")  # shorter than the preface: no need to wait for 24 bytes
    assert p.closed_with(E_PROTOCOL_ERROR)


def test_the_first_frame_must_be_settings():
    p = Peer(handshake=False)
    p.send(PREFACE + frame(PING, 0, 0, b"12345678"))
    assert p.closed_with(E_PROTOCOL_ERROR)


def test_partial_preface_waits():
    p = Peer(handshake=False)
    p.send(PREFACE[:10])
    p.send(PREFACE[10:] + frame(SETTINGS, 0, 0))
    assert not p.conn.closed
    assert any(f[0] == SETTINGS and f[1] == 1 for f in p.take())  # our ACK


def test_frame_larger_than_our_max_frame_size_is_refused_from_its_header():
    p = Peer(max_frame_size=1 << 14)
    p.send(frame(DATA, 0, 1, b"")[:3].replace(b"\x00\x00\x00", (1 << 14 | 1).to_bytes(3, "big")) + b"\x00" * 6)
    assert p.closed_with(E_FRAME_SIZE_ERROR)


def test_a_frame_at_the_limit_is_fine():
    p = Peer(max_frame_size=1 << 14)
    p.send(frame(0xFA, 0, 0, b"x" * (1 << 14)))  # unknown type at exactly the limit: ignored
    assert not p.conn.closed


@pytest.mark.parametrize("payload", [b"", b"1234567", b"123456789"])
def test_ping_must_be_8_bytes(payload):
    p = Peer()
    p.send(frame(PING, 0, 0, payload))
    assert p.closed_with(E_FRAME_SIZE_ERROR)


def test_ping_on_a_stream_and_ping_answered():
    p = Peer()
    p.send(frame(PING, 0, 0, b"abcdefgh"))
    assert [(f[0], f[1], f[3]) for f in p.take()] == [(PING, 1, b"abcdefgh")]
    p.send(frame(PING, 0, 1, b"abcdefgh"))
    assert p.closed_with(E_PROTOCOL_ERROR)


@pytest.mark.parametrize("payload,code", [
    (b"\x00\x00\x01", E_FRAME_SIZE_ERROR), (b"\x00\x00\x00\x01\x00", E_FRAME_SIZE_ERROR), (b"", E_FRAME_SIZE_ERROR),
    (U32.pack(0), E_PROTOCOL_ERROR), (U32.pack(2**31 - 1), E_FLOW_CONTROL_ERROR)])
def test_malformed_connection_window_update(payload, code):
    p = Peer()
    p.send(frame(WINDOW_UPDATE, 0, 0, payload))
    assert p.closed_with(code)


def test_stream_window_update_zero_increment_and_overflow_are_stream_errors():
    p = Peer()
    p.open(1)
    p.open(3)
    p.take()
    p.send(frame(WINDOW_UPDATE, 0, 1, U32.pack(0)) + frame(WINDOW_UPDATE, 0, 3, U32.pack(2**31 - 1)))
    assert rsts(p.take()) == {1: E_PROTOCOL_ERROR, 3: E_FLOW_CONTROL_ERROR}
    assert not p.conn.closed and not p.conn.streams
    assert [e[:2] for e in p.events if e[0] == ev.RESET] == [(ev.RESET, 1), (ev.RESET, 3)]


def test_window_update_on_an_idle_stream():
    p = Peer()
    p.send(frame(WINDOW_UPDATE, 0, 5, U32.pack(10)))
    assert p.closed_with(E_PROTOCOL_ERROR)


def test_window_update_on_a_closed_stream_is_ignored():
    p = Peer()
    p.open(1)
    p.send(frame(RST_STREAM, 0, 1, U32.pack(8)) + frame(WINDOW_UPDATE, 0, 1, U32.pack(10)))
    assert not p.conn.closed


@pytest.mark.parametrize("sid,payload,code", [
    (1, b"\x00\x00\x08", E_FRAME_SIZE_ERROR), (1, b"\x00\x00\x00\x08\x00", E_FRAME_SIZE_ERROR),
    (0, U32.pack(8), E_PROTOCOL_ERROR), (7, U32.pack(8), E_PROTOCOL_ERROR)])  # 7: idle
def test_malformed_rst_stream(sid, payload, code):
    p = Peer()
    p.open(1)
    p.send(frame(RST_STREAM, 0, sid, payload))
    assert p.closed_with(code)


def test_priority_rules():
    p = Peer()
    p.send(frame(PRIORITY, 0, 3, b"\x00\x00\x00\x01\x10"))  # fine, even on an idle stream
    p.send(frame(PRIORITY, 0, 5, b"\x00\x00\x00\x01"))       # wrong length: a stream error
    assert rsts(p.take()) == {5: E_FRAME_SIZE_ERROR}
    p.send(frame(PRIORITY, 0, 9, b"\x00\x00\x00\x09\x10"))   # depends on itself
    assert rsts(p.take()) == {9: E_PROTOCOL_ERROR}
    assert not p.conn.closed
    p.send(frame(PRIORITY, 0, 0, b"\x00\x00\x00\x01\x10"))
    assert p.closed_with(E_PROTOCOL_ERROR)


@pytest.mark.parametrize("flags,sid,payload,code", [
    (0, 0, b"\x00\x05\x00\x00", E_FRAME_SIZE_ERROR),            # not a multiple of 6
    (1, 0, b"\x00\x05\x00\x00\x40\x00", E_FRAME_SIZE_ERROR),    # ACK with a payload
    (0, 1, b"", E_PROTOCOL_ERROR),                               # on a stream
    (0, 0, struct.pack(">HI", 5, 0), E_PROTOCOL_ERROR),         # MAX_FRAME_SIZE 0
    (0, 0, struct.pack(">HI", 5, 1 << 24), E_PROTOCOL_ERROR),   # MAX_FRAME_SIZE > 2^24-1
    (0, 0, struct.pack(">HI", 4, 2**31), E_FLOW_CONTROL_ERROR),  # INITIAL_WINDOW_SIZE > 2^31-1
    (0, 0, struct.pack(">HI", 2, 2), E_PROTOCOL_ERROR)])        # ENABLE_PUSH 2
def test_malformed_settings(flags, sid, payload, code):
    p = Peer()
    p.send(frame(SETTINGS, flags, sid, payload))
    assert p.closed_with(code)


def test_settings_are_acknowledged_and_unknown_ones_ignored():
    p = Peer()
    p.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 0x99, 7) + struct.pack(">HI", 5, 1 << 15)))
    assert [(f[0], f[1]) for f in p.take()] == [(SETTINGS, 1)]
    assert p.conn.out.max_frame == 1 << 15


def test_empty_padded_data_and_padding_longer_than_the_payload():
    for payload in (b"", b"\x05abc", b"\x04abc"):  # RFC 9113 6.1: pad length >= payload length
        p = Peer()
        p.open(1)
        p.send(frame(DATA, 0x8, 1, payload))
        assert p.closed_with(E_PROTOCOL_ERROR), payload


def test_padding_shorter_than_the_payload_is_data():
    p = Peer()
    p.open(1)
    p.send(frame(DATA, 0x8, 1, b"\x02abcXY"))
    assert p.events[-1] == (ev.DATA, 1, b"abc", 0)


def test_padded_headers_with_too_much_padding():
    p = Peer()
    p.send(frame(HEADERS, 0x4 | 0x8, 1, b"\x09" + p.block()[:4]))
    assert p.closed_with(E_PROTOCOL_ERROR)


def test_headers_with_priority_and_padding():
    p = Peer()
    block = p.block()
    p.send(frame(HEADERS, 0x4 | 0x8 | 0x20, 1, b"\x03" + b"\x00\x00\x00\x00\x10" + block + b"pad"))
    assert p.events[-1][:3] == (ev.REQUEST, 1, "/envoy.service.ext_proc.v3.ExternalProcessor/Process")


@pytest.mark.parametrize("sid,code", [(0, E_PROTOCOL_ERROR), (2, E_PROTOCOL_ERROR)])
def test_headers_on_stream_0_or_an_even_stream(sid, code):
    p = Peer()
    p.send(frame(HEADERS, 0x4, sid, p.block()))
    assert p.closed_with(code)


def test_headers_reusing_a_closed_stream_id():
    p = Peer()
    p.open(3)
    p.send(frame(RST_STREAM, 0, 3, U32.pack(8)))
    p.open(1)  # lower than the last one opened
    assert p.closed_with(E_STREAM_CLOSED)


def test_data_on_stream_0_and_on_an_idle_stream():
    for sid in (0, 5):
        p = Peer()
        p.send(frame(DATA, 0, sid, b"abc"))
        assert p.closed_with(E_PROTOCOL_ERROR)


def test_data_on_a_closed_stream_is_dropped_but_its_window_comes_back():
    p = Peer(connection_window=1 << 20, max_message_size=1000)
    p.open(1)
    p.send(frame(RST_STREAM, 0, 1, U32.pack(8)))
    for _ in range(4):
        p.send(frame(DATA, 0, 1, b"x" * 200_000))
    assert not p.conn.closed and p.conn.recv.held == 0


def test_data_after_end_stream_is_a_stream_error():
    p = Peer()
    p.open(1, end_stream=True)
    p.send(frame(DATA, 0, 1, b"abc"))
    assert rsts(p.take()) == {1: E_STREAM_CLOSED}
    assert not p.conn.closed and 1 not in p.conn.streams


def test_trailers_must_end_the_stream():
    p = Peer()
    p.open(1)
    p.send(frame(HEADERS, 0x4, 1, p.enc.encode([("x-trailer", "1")])))
    assert rsts(p.take()) == {1: E_PROTOCOL_ERROR}
    p.open(3)
    p.send(frame(HEADERS, 0x5, 3, p.enc.encode([("x-trailer", "1")])))
    assert p.events[-1] == (ev.DATA, 3, b"", True)


def test_continuation_rules():
    p = Peer()
    block = p.block()
    p.send(frame(HEADERS, 0, 1, block[:3]) + frame(CONTINUATION, 0, 1, block[3:6]) + frame(CONTINUATION, 4, 1, block[6:]))
    assert p.events[-1][:2] == (ev.REQUEST, 1)
    for frames in ([frame(CONTINUATION, 4, 3, b"")],                                  # no HEADERS before it
                   [frame(HEADERS, 0, 3, b""), frame(CONTINUATION, 4, 5, b"")],      # another stream
                   [frame(HEADERS, 0, 3, b""), frame(PING, 0, 0, b"12345678")]):     # something else between
        p = Peer()
        p.send(b"".join(frames))
        assert p.closed_with(E_PROTOCOL_ERROR)


def test_endless_continuation_is_capped():
    p = Peer(max_header_block=4096)
    p.send(frame(HEADERS, 0, 1, b"\x00" * 1000))
    for _ in range(3):
        p.send(frame(CONTINUATION, 0, 1, b"\x00" * 1000))
    assert not p.conn.closed
    p.send(frame(CONTINUATION, 0, 1, b"\x00" * 1000))
    assert p.closed_with(E_ENHANCE_YOUR_CALM)
    assert p.conn.cont is None


def test_one_headers_frame_over_the_block_cap():
    p = Peer(max_header_block=1024)
    p.send(frame(HEADERS, 0, 1, b"\x00" * 1025))
    assert p.closed_with(E_ENHANCE_YOUR_CALM)


def test_header_list_over_the_advertised_size():
    p = Peer(max_header_list_size=1024)
    p.send(frame(HEADERS, 0x4, 1, p.block(extra=[("x-big", "v" * 2000)])))
    assert p.closed_with(E_ENHANCE_YOUR_CALM)


def test_hpack_garbage_is_a_compression_error():
    p = Peer()
    p.send(frame(HEADERS, 0x4, 1, b"\xff\xff\xff\xff\xff"))
    assert p.closed_with(E_COMPRESSION_ERROR)


def test_push_promise_from_a_client():
    p = Peer()
    p.send(frame(PUSH_PROMISE, 0x4, 1, U32.pack(2)))
    assert p.closed_with(E_PROTOCOL_ERROR)


def test_goaway_rules():
    p = Peer()
    p.send(frame(GOAWAY, 0, 0, b"\x00\x00\x00"))
    assert p.closed_with(E_FRAME_SIZE_ERROR)
    p = Peer()
    p.send(frame(GOAWAY, 0, 1, U32.pack(0) + U32.pack(0)))
    assert p.closed_with(E_PROTOCOL_ERROR)
    p = Peer()
    p.open(1)
    p.send(frame(GOAWAY, 0, 0, U32.pack(1) + U32.pack(0)))
    assert not p.conn.should_close  # stream 1 still open
    p.conn.reset_stream(1, 0)
    assert p.conn.should_close


def test_unknown_frame_types_are_ignored():
    p = Peer()
    p.send(frame(0x20, 0xFF, 1, b"whatever"))
    assert not p.conn.closed and p.take() == []


def test_nothing_is_read_after_a_connection_error():
    p = Peer()
    p.send(frame(PING, 0, 0, b"") + frame(HEADERS, 0x4, 1, p.block()))
    assert p.conn.closed
    assert not [e for e in p.events if e[0] == ev.REQUEST]
    assert p.send(frame(HEADERS, 0x4, 3, b"")) == []


def test_a_goaway_names_the_last_stream_and_the_reason():
    p = Peer()
    p.open(1)
    p.open(3)
    p.take()
    p.send(frame(PING, 0, 0, b""))
    last, code, why = p.goaway()
    assert (last, code) == (3, E_FRAME_SIZE_ERROR) and b"PING" in why


def test_data_frames_carry_messages():
    p = Peer()
    p.open(1)
    msg = grpc_message(b"hello")
    p.send(frame(DATA, 0x1, 1, msg))
    assert p.events[-1] == (ev.DATA, 1, msg, 1)
