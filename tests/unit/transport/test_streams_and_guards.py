"""Stream limits, flood guards, timeouts, graceful shutdown and the header-block cache."""

import struct

import hpack
import pytest
from h2peer import DATA, HEADERS, PING, RST_STREAM, SETTINGS, FakeClock, Peer, rsts

from extproc.transport.h2 import events as ev
from extproc.transport.h2.frames import (E_ENHANCE_YOUR_CALM, E_NO_ERROR, E_PROTOCOL_ERROR, E_REFUSED_STREAM,
                                         PREFACE, frame)
from extproc.transport.h2.headers import HeaderDecoder
from extproc.transport.limits import H2Limits

U32 = struct.Struct(">I")


def test_streams_beyond_the_limit_are_refused_and_hpack_stays_in_step():
    p = Peer(max_concurrent_streams=3)
    for sid in (1, 3, 5, 7, 9):
        p.open(sid)
    assert sorted(p.conn.streams) == [1, 3, 5]
    assert rsts(p.take()) == {7: E_REFUSED_STREAM, 9: E_REFUSED_STREAM}
    p.conn.reset_stream(1, 0)
    p.open(11, path="/a/b")  # its block refers to table entries the refused blocks added
    assert p.events[-1][:3] == (ev.REQUEST, 11, "/a/b")


def test_finished_streams_make_room():
    p = Peer(max_concurrent_streams=2)
    for sid in range(1, 200, 2):
        p.open(sid, end_stream=True)
        p.conn.end_stream(sid, b"")
    assert not rsts(p.take()) and not p.conn.streams


def test_rapid_reset_flood_is_calmed():
    clock = FakeClock()
    p = Peer(clock, max_resets_per_second=50)
    out = b""
    for i in range(100):
        sid = 2 * i + 1
        out += frame(HEADERS, 0x4, sid, p.block()) + frame(RST_STREAM, 0, sid, U32.pack(8))
    p.send(out)
    assert p.closed_with(E_ENHANCE_YOUR_CALM)
    assert len([e for e in p.events if e[0] == ev.REQUEST]) == 51  # parsing stopped at the limit


def test_resets_after_our_answer_are_free_and_the_budget_is_per_second():
    clock = FakeClock()
    p = Peer(clock, max_resets_per_second=10)
    for i in range(100):  # what Envoy does on every ext_proc stream: reset once answered
        sid = 2 * i + 1
        p.open(sid)
        p.conn.send_data(sid, b"answer", head=b"\x88")
        p.send(frame(RST_STREAM, 0, sid, U32.pack(2)))
    assert not p.conn.closed
    sid = 1001
    for _ in range(5):  # unanswered resets, 10 per second: within the budget
        for _ in range(10):
            p.open(sid)
            p.send(frame(RST_STREAM, 0, sid, U32.pack(8)))
            sid += 2
        clock.t += 1.0
    assert not p.conn.closed


def test_refused_streams_count_as_resets():
    p = Peer(max_concurrent_streams=1, max_resets_per_second=20)
    for sid in range(1, 60, 2):
        p.open(sid)
    assert p.closed_with(E_ENHANCE_YOUR_CALM)


def test_ping_flood():
    clock = FakeClock()
    p = Peer(clock, max_pings_per_second=10)
    p.send(frame(PING, 0, 0, b"12345678") * 10)
    clock.t += 1.0
    p.send(frame(PING, 0, 0, b"12345678") * 10)
    assert not p.conn.closed
    p.send(frame(PING, 0, 0, b"12345678"))
    assert p.closed_with(E_ENHANCE_YOUR_CALM)


def test_settings_flood():
    p = Peer(max_settings_per_second=5)  # the handshake's SETTINGS counts
    p.send(frame(SETTINGS, 0, 0) * 4)
    assert not p.conn.closed
    p.send(frame(SETTINGS, 0, 0))
    assert p.closed_with(E_ENHANCE_YOUR_CALM)


def test_handshake_timeout():
    clock = FakeClock()
    p = Peer(clock, handshake=False, handshake_timeout=2.0)
    p.send(PREFACE[:5])
    assert p.conn.check_timeouts(clock.t) == clock.t + 2.0
    clock.t += 1.9
    p.send(PREFACE[5:6])  # a byte at a time does not buy time
    assert p.conn.check_timeouts(clock.t) is not None
    clock.t += 0.1
    assert p.conn.check_timeouts(clock.t) is None
    assert p.closed_with(E_PROTOCOL_ERROR, reported=False)


def test_idle_timeout_counts_from_the_last_stream_and_ignores_pings():
    clock = FakeClock()
    p = Peer(clock, idle_timeout=10.0)
    p.open(1)
    clock.t += 100
    assert p.conn.check_timeouts(clock.t) is not None and not p.conn.closed  # a long call is not idle
    p.conn.reset_stream(1, 0)
    clock.t += 9
    p.send(frame(PING, 0, 0, b"12345678"))
    assert p.conn.check_timeouts(clock.t) == clock.t + 1
    clock.t += 1
    assert p.conn.check_timeouts(clock.t) is None
    assert p.closed_with(E_NO_ERROR, reported=False)


def test_graceful_shutdown_refuses_new_streams_and_closes_when_done():
    p = Peer()
    p.open(1)
    p.conn.shutdown()
    last, code, _ = p.goaway()
    assert (last, code) == (1, E_NO_ERROR)
    p.open(3)
    assert rsts(p.take()) == {3: E_REFUSED_STREAM}
    assert not p.conn.should_close
    p.send(frame(DATA, 0x1, 1, b""))
    p.conn.end_stream(1, b"")
    assert p.conn.should_close


def test_limits_are_validated():
    with pytest.raises(ValueError):
        H2Limits(max_frame_size=1000)
    with pytest.raises(ValueError):
        H2Limits(connection_window=1 << 20, max_message_size=1 << 20)
    with pytest.raises(ValueError):
        H2Limits(idle_timeout=0)
    with pytest.raises(Exception):
        H2Limits().max_frame_size = 1  # frozen


# -- the header-block cache ----------------------------------------------------------------
def test_repeated_blocks_skip_decoding_and_table_changes_clear_the_cache():
    enc = hpack.Encoder()
    dec = HeaderDecoder(1 << 16)
    base = [(":method", "POST"), (":path", "/a/A")]
    b1 = enc.encode(base)      # adds entries to the dynamic table
    b2 = enc.encode(base)      # pure references: the same bytes from now on
    assert dec.path_of(b1) == "/a/A" and not dec.cache
    assert dec.path_of(b2) == "/a/A" and b2 in dec.cache
    assert dec.path_of(b2) == "/a/A"
    b3 = enc.encode([(":method", "POST"), (":path", "/b/B")])  # a new path: the table changes
    assert dec.path_of(b3) == "/b/B" and not dec.cache  # indices shifted: old blocks mean other headers now
    b4 = enc.encode(base)
    assert dec.path_of(b4) == "/a/A"


def test_cache_follows_a_table_size_change():
    enc = hpack.Encoder()
    dec = HeaderDecoder(1 << 16)
    hdrs = [(":method", "POST"), (":path", "/a/A")]
    dec.path_of(enc.encode(hdrs))
    b = enc.encode(hdrs)
    dec.path_of(b)
    assert b in dec.cache
    enc.header_table_size = 0  # the next block starts with a size update, evicting everything
    assert dec.path_of(enc.encode(hdrs)) == "/a/A" and not dec.cache
