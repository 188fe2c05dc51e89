"""Attacks on a running server (extproc.transport in a subprocess, small limits from
attack_server.py): each must end in the right GOAWAY / RST_STREAM / gRPC status, keep the
server's memory bounded, and leave it answering a real grpcio health check on another
connection promptly. Every socket read is bounded by a deadline."""

import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import hpack
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from attack_server import LIMITS  # noqa: E402
from health import health_ok  # noqa: E402

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, REFUSED_STREAM, ENHANCE_YOUR_CALM = 0, 1, 3, 6, 7, 11
U32 = struct.Struct(">I")
RSS_BOUND_MB = 25  # server RSS growth allowed per attack (its baseline is ~60 MB)


def frame(ftype, flags, sid, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big") + payload


@pytest.fixture(scope="module")
def server():
    tmp = Path(tempfile.mkdtemp(prefix="attack-"))
    pf = tmp / "port"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = open(tmp / "server.log", "wb")
    p = subprocess.Popen([sys.executable, str(HERE / "attack_server.py"), str(pf)], stdout=log,
                         stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 15
    while not (pf.exists() and pf.read_text()):
        assert p.poll() is None and time.monotonic() < deadline, (tmp / "server.log").read_text()
        time.sleep(0.05)
    port = int(pf.read_text())
    assert health_ok(port)  # warm: imports, allocator
    start = rss_mb(p.pid)
    yield p, port
    # The table docs/reliability.md records (pytest -s shows it): every attack, its outcome,
    # how long the server took to end it, and the server's memory.
    print(f"\nraw HTTP/2 attacks on one server process (RSS {start:.1f} MB after warm-up)")
    print(f"{'attack':<62} {'ended with':<20} {'took':>7} {'RSS +MB':>8} {'served after':>12}")
    for name, how, took, grown, ok in REPORT:
        print(f"{name:<62} {how:<20} {took:6.2f}s {grown:8.1f} {'yes' if ok else 'NO':>12}")
    print(f"server alive at the end: {'yes' if p.poll() is None else 'NO'}; "
          f"RSS {rss_mb(p.pid):.1f} MB ({rss_mb(p.pid) - start:+.1f} MB over {len(REPORT)} attacks)")
    p.kill()
    p.wait(5)
    log.close()


REPORT: list[tuple[str, str, float, float, bool]] = []
CODES = {0: "GOAWAY NO_ERROR", 1: "GOAWAY PROTOCOL", 3: "GOAWAY FLOW_CONTROL", 6: "GOAWAY FRAME_SIZE",
         11: "GOAWAY CALM"}


def rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")



class Conn:
    """A raw HTTP/2 client socket; a thread reads frames as they come, so a GOAWAY is
    seen even if the server then resets the connection, until ``timeout``."""

    def __init__(self, port, preface=True):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.enc = hpack.Encoder()
        self.frames = []
        self.eof = threading.Event()
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()
        if preface:
            self.send(PREFACE + frame(SETTINGS, 0, 0))

    def _read(self):
        buf = b""
        self.s.settimeout(0.2)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                chunk = self.s.recv(1 << 16)
            except socket.timeout:
                continue
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                n = int.from_bytes(buf[:3], "big")
                self.frames.append((buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF, buf[9:9 + n]))
                buf = buf[9 + n:]
        self.eof.set()

    def send(self, data):
        """Send, stopping quietly once the server has closed (that is the point)."""
        try:
            self.s.sendall(data)
            return True
        except OSError:
            return False

    def block(self, path=PROCESS):
        return self.enc.encode([(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "x"),
                                ("content-type", "application/grpc"), ("te", "trailers")])

    def wait_closed(self, timeout=5.0):
        assert self.eof.wait(timeout), "server did not close the connection"
        self.s.close()

    def goaway_code(self):
        g = [f for f in self.frames if f[0] == GOAWAY]
        return U32.unpack(g[0][3][4:8])[0] if g else None

    def statuses(self):
        dec = hpack.Decoder()
        out = {}
        for f in list(self.frames):
            if f[0] == HEADERS:
                h = dict(dec.decode(f[3]))
                if "grpc-status" in h:
                    out[f[2]] = (int(h["grpc-status"]), h.get("grpc-message", ""))
        return out

    def wait_for(self, cond, timeout=3.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return True
            time.sleep(0.01)
        return False


def grpc_msg(raw):
    return b"\x00" + U32.pack(len(raw)) + raw


def attack(server, fn, *, code, closes=True, during_health=False, timeout=5.0):
    """Run one attack; check the GOAWAY code, memory, and that another connection is served."""
    p, port = server
    before = rss_mb(p.pid)
    c = Conn(port, preface=getattr(fn, "raw", False) is False)
    t = threading.Thread(target=fn, args=(c,), daemon=True)
    t0 = time.monotonic()
    t.start()
    if during_health:
        time.sleep(0.05)
        h0 = time.monotonic()
        assert health_ok(port, timeout=2.0), "server not serving during the attack"
        assert time.monotonic() - h0 < 1.0, "health check slow during the attack"
    t.join(timeout)
    assert not t.is_alive(), "attack did not finish: server not reading or not closing"
    if closes:
        c.wait_closed(timeout)
        assert c.goaway_code() == code, f"GOAWAY {c.goaway_code()}, frames {[f[:3] for f in c.frames[-5:]]}"
    took = time.monotonic() - t0
    assert p.poll() is None, "server died"
    served = health_ok(port, timeout=2.0)
    grown = rss_mb(p.pid) - before
    REPORT.append((os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0].removeprefix("test_"),
                   CODES.get(c.goaway_code(), f"code {c.goaway_code()}") if closes else "stream reset", took, grown, served))
    assert served, "server not serving after the attack"
    assert grown < RSS_BOUND_MB, f"server RSS grew by {grown:.0f} MB"
    return c, took


def test_settings_max_frame_size_zero(server):
    def go(c):
        c.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 5, 0)) + frame(HEADERS, 4, 1, c.block())
               + frame(DATA, 1, 1, grpc_msg(b"\x12\x00")))
    c, _ = attack(server, go, code=PROTOCOL_ERROR)
    assert not any(f[0] == DATA and not f[3] for f in c.frames)


def test_oversize_frame_is_refused_from_its_header(server):
    def go(c):
        c.send(frame(HEADERS, 4, 1, c.block()))
        c.send(((1 << 24) - 1).to_bytes(3, "big") + bytes([DATA, 0]) + U32.pack(1))  # a 16 MB DATA frame header ...
        c.send(b"x" * (4 << 20))                       # ... and 4 MB of it
    attack(server, go, code=FRAME_SIZE_ERROR)


def test_endless_continuation_50_mb(server):
    sent = []

    def go(c):
        c.send(frame(HEADERS, 0, 1, c.block()[:4]))
        chunk = frame(CONTINUATION, 0, 1, b"\x00" * (1 << 14)) * 64  # 1 MB per send
        n = 0
        while n < 50 << 20 and c.send(chunk):
            n += len(chunk)
        sent.append(n)
    attack(server, go, code=ENHANCE_YOUR_CALM, during_health=True)
    assert sent[0] < 50 << 20  # the server cut it off at the header block cap


def test_ten_thousand_streams_never_finished(server):
    def go(c):
        out = b"".join(frame(HEADERS, 4, 2 * i + 1, c.block()) for i in range(10_000))
        c.send(out)
    c, _ = attack(server, go, code=ENHANCE_YOUR_CALM, during_health=True)
    refused = [f for f in c.frames if f[0] == RST_STREAM and U32.unpack(f[3])[0] == REFUSED_STREAM]
    assert refused and min(f[2] for f in refused) == 2 * LIMITS.max_concurrent_streams + 1


def test_streams_up_to_the_limit_stay_open_and_are_served(server):
    p, port = server
    c = Conn(port)
    n = LIMITS.max_concurrent_streams
    c.send(b"".join(frame(HEADERS, 4, 2 * i + 1, c.block()) for i in range(n)))
    msg = grpc_msg(b"\x12\x04\x0a\x02hi")  # request_body{body:"hi"}
    c.send(b"".join(frame(DATA, 1, 2 * i + 1, msg) for i in range(n)))
    assert c.wait_for(lambda: len(c.statuses()) == n), len(c.statuses())
    assert set(c.statuses().values()) == {(0, "")}
    assert health_ok(port)
    c.s.close()


def test_rapid_reset_flood_50k(server):
    def go(c):
        blk = c.block()
        blk2 = c.block()  # from the second block on, the bytes repeat
        out = [frame(HEADERS, 4, 1, blk) + frame(RST_STREAM, 0, 1, U32.pack(8))]
        out += [frame(HEADERS, 4, 2 * i + 1, blk2) + frame(RST_STREAM, 0, 2 * i + 1, U32.pack(8))
                for i in range(1, 50_000)]
        c.send(b"".join(out))
    _, took = attack(server, go, code=ENHANCE_YOUR_CALM, during_health=True)
    assert took < 3.0


def test_bad_preface(server):
    def go(c):
        c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    go.raw = True
    attack(server, go, code=PROTOCOL_ERROR)


def test_huge_grpc_length_prefix(server):
    p, port = server
    before = rss_mb(p.pid)
    c = Conn(port)
    c.send(frame(HEADERS, 4, 1, c.block()) + frame(DATA, 0, 1, b"\x00\xff\xff\xff\xff" + b"x" * 1000))
    assert c.wait_for(lambda: 1 in c.statuses())
    assert c.statuses()[1][0] == 8  # RESOURCE_EXHAUSTED
    assert any(f[0] == RST_STREAM and f[2] == 1 for f in c.frames)
    # The connection is fine: the next call on it is served.
    c.send(frame(HEADERS, 4, 3, c.block()) + frame(DATA, 1, 3, grpc_msg(b"")))
    assert c.wait_for(lambda: c.statuses().get(3) == (0, ""))
    assert c.goaway_code() is None
    c.s.close()
    assert health_ok(port) and rss_mb(p.pid) - before < RSS_BOUND_MB


def test_slowloris_one_byte_per_second_is_cut_at_the_handshake_timeout(server):
    def go(c):
        for b in PREFACE:
            if not c.send(bytes([b])) or c.eof.wait(1.0):
                return
    go.raw = True
    _, took = attack(server, go, code=PROTOCOL_ERROR, timeout=LIMITS.handshake_timeout + 3)
    assert took < LIMITS.handshake_timeout + 1.5


def test_slowloris_after_the_handshake_is_cut_at_the_idle_timeout(server):
    def go(c):
        half = frame(PING, 0, 0, b"12345678")
        for b in half:  # a frame trickled in, a byte per 0.3 s, never a stream
            if not c.send(bytes([b])) or c.eof.wait(0.3):
                return
        c.eof.wait(5)
    _, took = attack(server, go, code=NO_ERROR, timeout=LIMITS.idle_timeout + 5)
    assert took < LIMITS.idle_timeout + 1.5


def test_abandoned_connection_is_closed_at_the_idle_timeout(server):
    def go(c):
        c.eof.wait(LIMITS.idle_timeout + 3)
    _, took = attack(server, go, code=NO_ERROR, timeout=LIMITS.idle_timeout + 5)
    assert LIMITS.idle_timeout - 0.2 < took < LIMITS.idle_timeout + 1.5


@pytest.mark.parametrize("sid,payload,code", [
    (0, b"\x00\x00\x01", FRAME_SIZE_ERROR), (0, U32.pack(0), PROTOCOL_ERROR), (0, U32.pack(2**31 - 1), FLOW_CONTROL_ERROR)],
    ids=["3_bytes", "zero_increment", "window_overflow"])
def test_malformed_window_update(server, sid, payload, code):
    def go(c):
        c.send(frame(WINDOW_UPDATE, 0, sid, payload))
    attack(server, go, code=code)


def test_empty_padded_data(server):
    def go(c):
        c.send(frame(HEADERS, 4, 1, c.block()) + frame(DATA, 0x8, 1, b""))
    attack(server, go, code=PROTOCOL_ERROR)


def test_zero_byte_ping(server):
    def go(c):
        c.send(frame(PING, 0, 0, b""))
    attack(server, go, code=FRAME_SIZE_ERROR)


def test_ping_flood(server):
    def go(c):
        c.send(frame(PING, 0, 0, b"12345678") * 10_000)
    c, _ = attack(server, go, code=ENHANCE_YOUR_CALM, during_health=True)
    assert len([f for f in c.frames if f[0] == PING]) <= LIMITS.max_pings_per_second


def test_settings_flood(server):
    def go(c):
        c.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 4, 65535)) * 10_000)
    attack(server, go, code=ENHANCE_YOUR_CALM, during_health=True)


def test_truncated_grpc_message_then_end_stream(server):
    def go(c):
        c.send(frame(HEADERS, 4, 1, c.block()) + frame(DATA, 1, 1, grpc_msg(b"\x12\x04\x0a\x02hi")[:6]))
        c.wait_for(lambda: 1 in c.statuses())
    c, _ = attack(server, go, code=None, closes=False)
    status, message = c.statuses()[1]
    assert status == 13 and "incomplete" in message  # INTERNAL, not OK
    c.s.close()
