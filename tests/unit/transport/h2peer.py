"""A scripted HTTP/2 client for the sans-IO tests: builds frames, feeds them to an
``H2ServerConnection`` and parses what it sends back. No sockets, no event loop."""

from __future__ import annotations

import struct

import hpack

from extproc.transport.h2 import events as ev
from extproc.transport.h2.connection import H2ServerConnection
from extproc.transport.h2.frames import PREFACE, frame
from extproc.transport.limits import H2Limits

PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
REQUEST_HEADERS = [(":method", "POST"), (":scheme", "http"), (":path", PROCESS), (":authority", "x"),
                   ("content-type", "application/grpc"), ("te", "trailers")]


def parse_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 0
    while len(data) - pos >= 9:
        n = int.from_bytes(data[pos:pos + 3], "big")
        out.append((data[pos + 3], data[pos + 4], int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF,
                    data[pos + 9:pos + 9 + n]))
        pos += 9 + n
    assert pos == len(data), "server output ends in a partial frame"
    return out


def grpc_message(raw: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(raw)) + raw


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Peer:
    def __init__(self, clock: FakeClock | None = None, handshake: bool = True, **limits) -> None:
        self.clock = clock or FakeClock()
        self.limits = H2Limits(**limits)
        self.conn = H2ServerConnection(self.limits, self.clock)
        self.conn.initiate()
        self.enc = hpack.Encoder()
        self.server_settings = parse_frames(self.conn.data_to_send())
        self.events: list = []
        if handshake:
            self.send(PREFACE + frame(SETTINGS, 0, 0))
            self.take()

    def send(self, data: bytes) -> list:
        evs = self.conn.receive_data(data)
        self.events += evs
        return evs

    def take(self) -> list[tuple[int, int, int, bytes]]:
        return parse_frames(self.conn.data_to_send())

    def block(self, path: str = PROCESS, extra: list | None = None) -> bytes:
        return self.enc.encode([(k, v) if k != ":path" else (k, path) for k, v in REQUEST_HEADERS] + (extra or []))

    def open(self, sid: int, end_stream: bool = False, path: str = PROCESS) -> list:
        return self.send(frame(HEADERS, 0x4 | (0x1 if end_stream else 0), sid, self.block(path)))

    # -- what came back ---------------------------------------------------------------
    def goaway(self, frames=None) -> tuple[int, int, bytes] | None:
        """(last stream id, error code, debug data) of the GOAWAY sent, if any."""
        for f in frames if frames is not None else self.take():
            if f[0] == GOAWAY:
                return int.from_bytes(f[3][:4], "big"), int.from_bytes(f[3][4:8], "big"), f[3][8:]
        return None

    def closed_with(self, code: int, reported: bool = True) -> bool:
        """Closed with a GOAWAY carrying ``code`` (and, for errors found in input, a CLOSED event)."""
        g = self.goaway()
        return self.conn.closed and g is not None and g[1] == code and (
            not reported or (ev.CLOSED, code) in [e[:2] for e in self.events])


def rsts(frames) -> dict[int, int]:
    return {f[2]: int.from_bytes(f[3], "big") for f in frames if f[0] == RST_STREAM}


def window_updates(frames) -> dict[int, int]:
    out: dict[int, int] = {}
    for f in frames:
        if f[0] == WINDOW_UPDATE:
            out[f[2]] = out.get(f[2], 0) + int.from_bytes(f[3], "big")
    return out
