"""The KV-event subscribers of one gateway for one ``KvEventsSpec``, and the index they feed.

One ``EventStream`` per backend, following the fleet: every policy that reads the events
says which backends it wants (``want(owner, addresses)``, from its ``on_candidates``) and
lets go when it closes (``release``); a backend nobody wants any more is unsubscribed
and its entries dropped from the index. A reload that keeps the same spec keeps the hub
(``StateStores.shared``), so the index stays warm and a bound port is never bound twice.

Sockets are shared by URL: a backend's own connect socket, or one bound socket that
several engines connect to. On a shared bound socket a message is attributed by its
topic (``spec.topic``), else by the peer's IP address (when one backend has that host),
else it is counted as ``unattributed`` and dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Iterable

from ...state.kv_block_index import KvBlockIndex
from .sockets import ReplayClient, SubSocket
from .spec import KvEventsSpec
from .stream import EventStream
from .wire import WireError, split_frames

log = logging.getLogger("ai_lb.kv_events")


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


class _Shared:
    __slots__ = ("sock", "addresses", "by_topic", "by_host")

    def __init__(self, sock: SubSocket) -> None:
        self.sock = sock
        self.addresses: set[str] = set()
        self.by_topic: dict[bytes, str] = {}
        self.by_host: dict[str, list[str]] = {}

    def attribute(self, topic: bytes, peer: str | None) -> str | None:
        """Which backend sent a message: the only one here, else by topic, else by peer IP."""
        if len(self.addresses) == 1 and (not self.by_topic or topic in self.by_topic):
            return next(iter(self.addresses))
        if self.by_topic:
            return self.by_topic.get(topic)
        if peer is not None:
            cands = self.by_host.get(peer)
            if cands is not None and len(cands) == 1:
                return cands[0]
        return None


class KvEventsHub:
    def __init__(self, spec: KvEventsSpec, clock=time.monotonic) -> None:
        self.spec = spec
        self.clock = clock
        self.index = KvBlockIndex(spec.max_blocks, spec.max_blocks_per_endpoint)
        self.streams: dict[str, EventStream] = {}
        self.counts: dict[str, int] = {}
        self._owners: dict[int, frozenset[str]] = {}
        self._sockets: dict[tuple[str, bool], _Shared] = {}
        self._sock_of: dict[str, tuple[str, bool]] = {}
        self._replay: dict[str, ReplayClient | None] = {}
        self._replay_wait: dict[str, tuple[float, float]] = {}   # address -> (not before, backoff)
        self._tasks: set[asyncio.Task] = set()
        self._ctx = None

    # -- following the fleet ----------------------------------------------------------------
    def want(self, owner: object, addresses: Iterable[str]) -> None:
        self._owners[id(owner)] = frozenset(addresses)
        self._sync()

    def release(self, owner: object) -> None:
        if self._owners.pop(id(owner), None) is not None:
            self._sync()

    def _sync(self) -> None:
        wanted = frozenset().union(*self._owners.values()) if self._owners else frozenset()
        for a in [a for a in self.streams if a not in wanted]:
            self._remove(a)
        for a in sorted(wanted - self.streams.keys()):
            self._add(a)
        self._start_sockets()

    def _add(self, address: str) -> None:
        spec = self.spec
        url = spec.url(address)
        bind = spec.binds(url)
        replay = spec.replay_url(address)
        st = EventStream(address, self.index, replay=replay is not None, mediums=spec.mediums,
                         rebuild_window=spec.rebuild_window, stale_requests=spec.stale_requests,
                         max_pending=spec.hwm, clock=self.clock)
        self.streams[address] = st
        key = (url, bind)
        sh = self._sockets.get(key)
        if sh is None:
            sh = self._sockets[key] = _Shared(None)  # type: ignore[arg-type]
        sh.addresses.add(address)
        topic = spec.topic_of(address)
        if topic is not None:
            sh.by_topic[topic.encode()] = address
        sh.by_host.setdefault(address.rpartition(":")[0].strip("[]"), []).append(address)
        self._sock_of[address] = key
        st.connected = False if len(sh.addresses) == 1 else None
        if len(sh.addresses) > 1:
            for a in sh.addresses:
                self.streams[a].connected = None   # a shared socket cannot tell who is connected
        if replay is not None:
            self._replay[address] = None   # made with the sockets, on the event loop
        log.info("kv events: %s from %s (%s)%s", address, url, "bind" if bind else "connect",
                 f", replay {replay}" if replay else "")

    def _remove(self, address: str) -> None:
        st = self.streams.pop(address)
        st.close()
        for k, n in st.counts.items():   # kept, so the exported counts never go down
            self.counts[k] = self.counts.get(k, 0) + n
        key = self._sock_of.pop(address)
        sh = self._sockets[key]
        sh.addresses.discard(address)
        sh.by_topic = {t: a for t, a in sh.by_topic.items() if a != address}
        for h, lst in list(sh.by_host.items()):
            if address in lst:
                lst.remove(address)
                if not lst:
                    del sh.by_host[h]
        if not sh.addresses:
            if sh.sock is not None:
                sh.sock.close()
            del self._sockets[key]
        rc = self._replay.pop(address, None)
        if rc is not None:
            rc.close()
        self._replay_wait.pop(address, None)

    # -- sockets --------------------------------------------------------------------------------
    def _context(self):
        if self._ctx is None:
            import zmq.asyncio

            self._ctx = zmq.asyncio.Context()
        return self._ctx

    def _start_sockets(self) -> None:
        if not _loop_running():
            return                       # no event loop yet (tools, tests): started on the next call in one
        for key, sh in self._sockets.items():
            if sh.sock is None:
                url, bind = key
                sh.sock = SubSocket(self._context(), url, bind,
                                    on_frames=lambda f, p, k=key: self._on_frames(k, f, p),
                                    on_connected=lambda k=key: self._on_link(k, True),
                                    on_disconnected=lambda k=key: self._on_link(k, False),
                                    hwm=self.spec.hwm)
                sh.sock.start()
        for a, rc in list(self._replay.items()):
            if rc is None:
                url = self.spec.replay_url(a)
                self._replay[a] = ReplayClient(self._context(), url, timeout=self.spec.replay_timeout,
                                               max_batches=max(self.spec.hwm, 20_000))

    def _on_link(self, key: tuple[str, bool], up: bool) -> None:
        sh = self._sockets.get(key)
        if sh is None or len(sh.addresses) != 1:
            return
        st = self.streams[next(iter(sh.addresses))]
        if up:
            start = st.on_connected()
            if start is not None:
                self._replay_from(st, start)
        else:
            st.on_disconnected()

    def _on_frames(self, key: tuple[str, bool], frames: list, peer: str | None) -> None:
        try:
            msg = split_frames(frames)
        except WireError:
            self._count("malformed_frames")
            return
        sh = self._sockets.get(key)
        if sh is None:
            return
        address = sh.attribute(msg.topic, peer)
        if address is None:
            self._count("unattributed")
            return
        st = self.streams[address]
        start = st.on_message(msg.seq, msg.payload)
        if start is not None:
            self._replay_from(st, start)

    # -- replay --------------------------------------------------------------------------------
    def _replay_from(self, st: EventStream, start: int) -> None:
        rc = self._replay.get(st.address)
        now = self.clock()
        not_before, backoff = self._replay_wait.get(st.address, (0.0, 0.5))
        if rc is None or now < not_before:
            self._count("replay_skipped")
            st.on_replay(None)
            return
        task = asyncio.get_running_loop().create_task(self._replay_task(st, rc, start, backoff))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _replay_task(self, st: EventStream, rc: ReplayClient, start: int, backoff: float) -> None:
        batches = await rc.fetch(start)
        if self.streams.get(st.address) is not st:
            return                        # unsubscribed meanwhile
        if batches is None:
            self._replay_wait[st.address] = (self.clock() + backoff, min(30.0, backoff * 2))
        else:
            self._replay_wait.pop(st.address, None)
        st.on_replay(batches)

    # -- reading -----------------------------------------------------------------------------
    def stream(self, address: str) -> EventStream | None:
        return self.streams.get(address)

    def block_size(self, address: str) -> int:
        v = self.index.get(address)
        return v.block_size if v is not None else 0

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def stats(self) -> dict[str, int]:
        out = dict(self.counts)
        for st in self.streams.values():
            for k, n in st.counts.items():
                out[k] = out.get(k, 0) + n
        for k, n in self.index.counts.items():
            out[k] = out.get(k, 0) + n
        return out

    def close(self) -> None:
        for a in list(self.streams):
            self._remove(a)
        self._owners.clear()
        for t in self._tasks:
            t.cancel()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None
