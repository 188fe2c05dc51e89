"""Flow control in both directions: window goes back to the client only as the
application consumes what it was sent; our output respects the client's windows."""

import struct

import pytest
from h2peer import DATA, HEADERS, RST_STREAM, SETTINGS, WINDOW_UPDATE, Peer, grpc_message, rsts, window_updates

from extproc.transport.h2 import events as ev
from extproc.transport.h2.flow import RecvWindow
from extproc.transport.h2.frames import E_FLOW_CONTROL_ERROR, frame

U32 = struct.Struct(">I")


def test_our_settings_advertise_the_limits():
    p = Peer(max_frame_size=1 << 15, max_concurrent_streams=7, stream_window=1 << 16, connection_window=1 << 21,
             max_message_size=1 << 20, max_header_list_size=4096)
    (settings, wu) = p.server_settings
    assert settings[0] == SETTINGS
    values = dict(struct.unpack(">HI", settings[3][i:i + 6]) for i in range(0, len(settings[3]), 6))
    assert values == {3: 7, 4: 1 << 16, 5: 1 << 15, 6: 4096}
    assert wu[0] == WINDOW_UPDATE and wu[2] == 0 and U32.unpack(wu[3])[0] == (1 << 21) - 65535


def test_window_returns_only_as_the_application_consumes():
    p = Peer(stream_window=1 << 16, connection_window=1 << 20, max_message_size=1 << 16)
    p.open(1)
    chunk = b"x" * 16000
    for _ in range(4):
        p.send(frame(DATA, 0, 1, chunk))
    assert window_updates(p.take()) == {}  # nothing consumed: nothing given back
    assert p.conn.streams[1].held == 64000 and p.conn.recv.held == 64000
    p.send(frame(DATA, 0, 1, b"x" * 2000))  # over the 65536 stream window
    assert rsts(p.take()) == {1: E_FLOW_CONTROL_ERROR}
    assert p.conn.recv.held == 0  # the reset stream's bytes were freed


def test_acknowledged_bytes_come_back_in_batches():
    p = Peer(stream_window=1 << 16, connection_window=1 << 20, max_message_size=1 << 16)
    p.open(1)
    p.send(frame(DATA, 0, 1, b"x" * 40000))
    p.conn.acknowledge(1, 20000)
    assert window_updates(p.take()) == {}  # under half the stream window
    p.conn.acknowledge(1, 20000)
    assert window_updates(p.take()) == {1: 40000}  # half the stream window due: sent
    assert p.conn.recv.unreturned == 40000  # the connection's half is 512 KiB away


def test_the_connection_window_bounds_what_all_streams_buffer():
    p = Peer(stream_window=1 << 16, connection_window=100_000, max_message_size=50_000)
    for sid in (1, 3):
        p.open(sid)
        p.send(frame(DATA, 0, sid, b"x" * 50_000))
    assert not p.conn.closed
    p.send(frame(DATA, 0, 1, b"x"))
    assert p.closed_with(E_FLOW_CONTROL_ERROR)


def test_a_message_larger_than_the_stream_window_widens_it_once():
    p = Peer(stream_window=1 << 16, connection_window=1 << 22, max_message_size=1 << 21)
    p.open(1)
    p.send(frame(DATA, 0, 1, b"\x00" + U32.pack(300_000) + b"x" * 1000))
    p.conn.expect(1, 300_005 - 1005)
    wu = window_updates(p.take())
    st = p.conn.streams[1]
    assert st.available >= 300_005 - 1005 and wu[1] == st.available - (65536 - 1005)
    for _ in range(3):
        p.send(frame(DATA, 0, 1, b"x" * 99_000))
    p.send(frame(DATA, 0, 1, b"x" * 2000))
    assert not p.conn.closed and not rsts(p.take())
    p.conn.acknowledge(1, 300_005)  # the handler read it: the widening is absorbed
    assert st.limit == st.initial and st.held == 0


def test_widening_stops_at_one_message_past_the_window():
    w = RecvWindow(1000, ceiling=1000 + 5000)
    assert w.receive(1000)
    assert w.widen(10_000) == 5000  # only up to the ceiling
    assert w.available == 5000 and w.limit == 6000


def test_recv_window_invariant():
    w = RecvWindow(1000)
    assert w.receive(600) and not w.receive(401)
    assert w.release(400) == 0 and w.release(200) == 600
    assert w.available + w.held + w.unreturned == w.limit == 1000


def test_padding_is_given_back_at_once():
    p = Peer(stream_window=300, connection_window=1 << 20, max_message_size=1000)
    p.open(1)
    p.send(frame(DATA, 0x8, 1, b"\xc7" + b"ab" + b"\x00" * 0xC7))
    assert p.events[-1] == (ev.DATA, 1, b"ab", 0)
    assert p.conn.streams[1].held == 2
    assert window_updates(p.take()) == {1: 200}  # 1 + 199 padding bytes, over half the window


def test_no_window_update_for_a_stream_the_client_finished():
    p = Peer(stream_window=1000, connection_window=1 << 20, max_message_size=900)
    p.open(1)
    p.send(frame(DATA, 1, 1, b"x" * 800))
    p.conn.acknowledge(1, 800)
    assert 1 not in window_updates(p.take())


# -- sending ---------------------------------------------------------------------------
def test_output_waits_for_the_clients_window_and_trailers_wait_for_the_data():
    p = Peer()
    p.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 10)))  # client stream window: 10 bytes
    p.open(1, end_stream=True)
    p.take()
    p.conn.send_data(1, b"0123456789abcdef", head=b"\x88")
    p.conn.end_stream(1, b"trailers")
    frames = p.take()
    assert [(f[0], f[3]) for f in frames] == [(HEADERS, b"\x88"), (DATA, b"0123456789")]
    p.send(frame(WINDOW_UPDATE, 0, 1, U32.pack(100)))
    frames = p.take()
    assert [(f[0], f[1], f[3]) for f in frames] == [(DATA, 0, b"abcdef"), (HEADERS, 0x5, b"trailers")]
    assert 1 not in p.conn.streams


def test_output_is_split_at_the_clients_max_frame_size():
    p = Peer()
    p.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 1 << 20) + struct.pack(">HI", 5, 1 << 14)))
    p.send(frame(WINDOW_UPDATE, 0, 0, U32.pack(1 << 20)))
    p.open(1, end_stream=True)
    p.take()
    p.conn.send_data(1, b"x" * 40000)
    sizes = [len(f[3]) for f in p.take() if f[0] == DATA]
    assert sizes == [16384, 16384, 40000 - 32768]


def test_a_lower_initial_window_can_make_windows_negative_and_output_waits():
    p = Peer()
    p.open(1, end_stream=True)
    p.conn.send_data(1, b"x" * 100)
    p.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 0)))
    assert p.conn.streams[1].send_window == -100
    p.take()
    p.conn.send_data(1, b"y")
    assert not [f for f in p.take() if f[0] == DATA]


def test_initial_window_overflowing_a_stream_window():
    p = Peer()
    p.open(1, end_stream=True)
    p.send(frame(WINDOW_UPDATE, 0, 1, U32.pack(2**31 - 1 - 65535)))
    p.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 65536)))
    assert p.closed_with(E_FLOW_CONTROL_ERROR)


def test_abort_drops_held_back_data_and_ends_at_once():
    p = Peer()
    p.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 1)))
    p.open(1)
    p.take()
    p.conn.send_data(1, b"abc", head=b"\x88")
    p.conn.end_stream(1, b"status", abort=True)
    frames = p.take()
    assert [(f[0], f[3]) for f in frames] == [(HEADERS, b"\x88"), (DATA, b"a"), (HEADERS, b"status"),
                                              (RST_STREAM, b"\x00\x00\x00\x00")]


@pytest.mark.parametrize("first", [b"T", b"\x00"])
def test_held_back_data_is_data_whatever_its_first_byte(first):
    p = Peer()
    p.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 2)))
    p.open(1, end_stream=True)
    p.take()
    p.conn.send_data(1, b"ab" + first * 5)
    p.conn.end_stream(1, b"t")
    assert [(f[0], f[3]) for f in p.take()] == [(DATA, b"ab")]
    p.send(frame(WINDOW_UPDATE, 0, 1, U32.pack(100)))
    frames = p.take()
    assert [(f[0], f[3]) for f in frames] == [(DATA, first * 5), (HEADERS, b"t")]


def test_grpc_message_helper():
    assert grpc_message(b"ab") == b"\x00\x00\x00\x00\x02ab"
