"""Option (b) and (e) of ``aibench.transport``: a small gRPC layer over python-hyper's
``h2`` (sans-IO) on an asyncio Protocol, kept apart from the driver so each module stays
short. Needs ``pip install h2``."""

from __future__ import annotations

import asyncio


class H2Layer:
    """Option (b): gRPC over python-hyper's ``h2`` state machine, on an asyncio Protocol.

    h2 does the framing, HPACK, stream states, flow-control accounting and validation
    (frame sizes, header list size, concurrent streams); this class only maps its events
    to gRPC calls: one task per stream, messages split out of DATA, window given back as
    messages are taken off, status in trailers.
    """

    def __init__(self, methods: dict, eof, validate: bool = True) -> None:
        self.methods = methods
        self.eof = eof
        self.validate = validate

    def protocol(self):
        import h2.config
        import h2.connection
        import h2.events
        import h2.settings

        layer = self
        v = self.validate
        cfg = h2.config.H2Configuration(client_side=False, header_encoding=None, validate_outbound_headers=v,
                                        normalize_outbound_headers=v, validate_inbound_headers=v,
                                        normalize_inbound_headers=v)
        ev = h2.events

        class Stream:
            __slots__ = ("sid", "buf", "msgs", "waiter", "ended", "task", "proto", "decode", "headers_sent")

            def __init__(self, proto, sid, decode):
                self.proto, self.sid, self.decode = proto, sid, decode
                self.buf = bytearray()
                self.msgs = []
                self.waiter = None
                self.ended = False
                self.task = None
                self.headers_sent = False

            async def read(self):
                while True:
                    if self.msgs:
                        return self.msgs.pop(0)
                    if self.ended:
                        return layer.eof
                    self.waiter = asyncio.get_running_loop().create_future()
                    try:
                        await self.waiter
                    finally:
                        self.waiter = None

            async def write(self, msg):
                raw = msg.SerializeToString()
                c = self.proto.conn
                if not self.headers_sent:
                    self.headers_sent = True
                    c.send_headers(self.sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
                c.send_data(self.sid, b"\x00" + len(raw).to_bytes(4, "big") + raw)
                self.proto.flush()

            def wake(self):
                if self.waiter is not None and not self.waiter.done():
                    self.waiter.set_result(None)

        class Proto(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport
                self.conn = h2.connection.H2Connection(config=cfg)
                self.conn.local_settings = h2.settings.Settings(client=False, initial_values={
                    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000,
                    h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 64 << 10,
                    h2.settings.SettingCodes.MAX_FRAME_SIZE: 1 << 20,
                    h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 4 << 20})
                self.conn.initiate_connection()
                self.conn.increment_flow_control_window(16 << 20)
                self.streams = {}
                self.flush()

            def flush(self):
                data = self.conn.data_to_send()
                if data:
                    self.transport.write(data)

            def data_received(self, data):
                try:
                    events = self.conn.receive_data(data)
                except Exception:  # noqa: BLE001 - h2 queued the GOAWAY
                    self.flush()
                    self.transport.close()
                    return
                for e in events:
                    t = type(e)
                    if t is ev.RequestReceived:
                        path = dict(e.headers).get(b":path", b"").decode()
                        m = layer.methods.get(path)
                        if m is None:
                            self.conn.send_headers(e.stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                                                 (b"grpc-status", b"12")], end_stream=True)
                            continue
                        s = Stream(self, e.stream_id, m[0])
                        self.streams[e.stream_id] = s
                        s.task = asyncio.get_running_loop().create_task(self.run(s, m[1]))
                    elif t is ev.DataReceived:
                        s = self.streams.get(e.stream_id)
                        if s is None:
                            continue
                        s.buf += e.data
                        while len(s.buf) >= 5:
                            n = int.from_bytes(s.buf[1:5], "big")
                            if len(s.buf) < 5 + n:
                                break
                            s.msgs.append(s.decode(bytes(s.buf[5:5 + n])))
                            del s.buf[:5 + n]
                        if e.flow_controlled_length:
                            self.conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                        s.wake()
                    elif t is ev.StreamEnded:
                        s = self.streams.get(e.stream_id)
                        if s is not None:
                            s.ended = True
                            s.wake()
                    elif t is ev.StreamReset:
                        s = self.streams.pop(e.stream_id, None)
                        if s is not None and s.task is not None:
                            s.task.cancel()
                self.flush()

            async def run(self, s, handler):
                try:
                    await handler(s)
                except asyncio.CancelledError:
                    return
                if self.streams.pop(s.sid, None) is None:
                    return
                hdrs = [(b"grpc-status", b"0")]
                if not s.headers_sent:
                    hdrs = [(b":status", b"200"), (b"content-type", b"application/grpc")] + hdrs
                try:
                    self.conn.send_headers(s.sid, hdrs, end_stream=True)
                except Exception:  # noqa: BLE001 - stream already closed by the peer
                    return
                self.flush()

            def connection_lost(self, exc):
                for s in self.streams.values():
                    if s.task is not None:
                        s.task.cancel()

        return Proto
