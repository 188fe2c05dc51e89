"""The ZeroMQ side (pyzmq on asyncio): SUB sockets that bind or connect, and replay requests.

* ``SubSocket``: one SUB socket. **Connect** (the engine binds ``tcp://*:P``): ZeroMQ
  itself reconnects with exponential backoff (``RECONNECT_IVL`` 100 ms doubling to
  ``RECONNECT_IVL_MAX`` 5 s). **Bind** (the engine was given ``tcp://<ai-lb host>:P`` and
  connects out): a failed bind (port taken) is retried with the same backoff. A socket
  monitor reports connects and disconnects. The receive queue is bounded by ``RCVHWM``:
  past it ZeroMQ drops messages, which the stream sees as a sequence gap. Each message
  is handed to ``on_frames`` on the event loop; the reader yields to the loop every 64
  messages so a burst of events never starves request handling.
* ``ReplayClient``: vLLM's replay protocol. A DEALER sends ``[b"", start_seq (8 bytes,
  big-endian)]`` to the engine's ROUTER (``replay_endpoint``) and reads ``[b"", seq,
  payload]`` per buffered batch with ``seq >= start_seq``, then ``[b"", -1 (8 bytes,
  signed), b""]``. Bounded in time (``timeout``) and size (``max_batches``); on a timeout
  the socket is closed, so a late answer cannot be mistaken for the next one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger("ai_lb.kv_events")
END_SEQ = -1
MAX_MESSAGE = 64 << 20   # bytes: a larger message closes the connection (ZeroMQ), seen as a gap
_MON_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED


class SubSocket:
    def __init__(self, ctx: zmq.asyncio.Context, url: str, bind: bool,
                 on_frames: Callable[[list, str | None], None],
                 on_connected: Callable[[], None], on_disconnected: Callable[[], None],
                 hwm: int = 10_000, backoff_max: float = 5.0) -> None:
        self.ctx = ctx
        self.url = url
        self.bind = bind
        self.on_frames = on_frames
        self.on_connected = on_connected
        self.on_disconnected = on_disconnected
        self.hwm = hwm
        self.backoff_max = backoff_max
        self.sock: zmq.asyncio.Socket | None = None
        self.bound = False
        self.error: str | None = None
        self.received = 0
        self._tasks: list[asyncio.Task] = []
        self._mon = None
        self._closed = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._run(), name=f"kv-events {self.url}"))

    def _open(self) -> zmq.asyncio.Socket:
        s = self.ctx.socket(zmq.SUB)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVHWM, self.hwm)
        s.setsockopt(zmq.RECONNECT_IVL, 100)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, int(self.backoff_max * 1000))
        s.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        s.setsockopt(zmq.SUBSCRIBE, b"")
        return s

    async def _run(self) -> None:
        delay = 0.1
        while not self._closed:
            sock = self._open()
            try:
                if self.bind:
                    sock.bind(self.url)
                    self.bound = True
                else:
                    sock.connect(self.url)
            except zmq.ZMQError as e:
                sock.close(linger=0)
                self.error = str(e)
                log.warning("kv events: cannot %s %s: %s (retrying in %.1fs)",
                            "bind" if self.bind else "connect", self.url, e, delay)
                await asyncio.sleep(delay)
                delay = min(self.backoff_max, delay * 2)
                continue
            self.error = None
            self.sock = sock
            mon = self._mon = sock.get_monitor_socket(_MON_EVENTS)
            self._tasks.append(asyncio.get_running_loop().create_task(self._monitor(mon)))
            await self._read(sock)
            return

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        n = 0
        while not self._closed:
            try:
                frames = await sock.recv_multipart(copy=False)
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            peer = None
            try:
                peer = frames[0].get("Peer-Address")
            except (zmq.ZMQError, AttributeError, KeyError, TypeError):
                pass
            self.received += 1
            try:
                self.on_frames(frames, peer)
            except Exception:  # noqa: BLE001 - bad input never stops the stream
                log.exception("kv events: a message from %s could not be applied", self.url)
            n += 1
            if n % 64 == 0:
                await asyncio.sleep(0)

    async def _monitor(self, mon) -> None:
        while not self._closed:
            try:
                msg = parse_monitor_message(await mon.recv_multipart())
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            except Exception:  # noqa: BLE001
                continue
            ev = msg.get("event")
            if ev in (zmq.EVENT_CONNECTED, zmq.EVENT_ACCEPTED):
                self.on_connected()
            elif ev == zmq.EVENT_DISCONNECTED:
                self.on_disconnected()

    def close(self) -> None:
        self._closed = True
        for t in self._tasks:
            t.cancel()
        self._tasks = []
        if self.sock is not None:
            try:
                self.sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self.sock.close(linger=0)
            self.sock = None
        if self._mon is not None:
            self._mon.close(linger=0)
            self._mon = None


class ReplayClient:
    def __init__(self, ctx: zmq.asyncio.Context, url: str, timeout: float = 2.0,
                 max_batches: int = 20_000) -> None:
        self.ctx = ctx
        self.url = url
        self.timeout = timeout
        self.max_batches = max_batches
        self.sock: zmq.asyncio.Socket | None = None

    async def fetch(self, start: int) -> list[tuple[int, bytes]] | None:
        """Every buffered batch from ``start`` on, or None (timeout, too many, bad answer)."""
        if self.sock is None:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVHWM, self.max_batches + 16)
            s.connect(self.url)
            self.sock = s
        sock = self.sock
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        out: list[tuple[int, bytes]] = []
        try:
            await asyncio.wait_for(sock.send_multipart((b"", max(0, start).to_bytes(8, "big"))), self.timeout)
            while True:
                frames = await asyncio.wait_for(sock.recv_multipart(), max(0.001, deadline - loop.time()))
                if len(frames) != 3 or len(frames[1]) != 8:
                    raise ValueError("replay answer is not [b'', seq, payload]")
                seq = int.from_bytes(frames[1], "big", signed=True)
                if seq == END_SEQ:
                    return out
                out.append((seq, frames[2]))
                if len(out) > self.max_batches:
                    raise ValueError("replay answer longer than max_batches")
        except (asyncio.TimeoutError, ValueError, zmq.ZMQError) as e:
            log.info("kv events: replay from %s (seq %d) failed: %s", self.url, start, e or type(e).__name__)
            self.close()
            return None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
