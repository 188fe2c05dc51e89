"""Completions between the worker processes of one ai-lb (``server.workers`` > 1).

Envoy's access log stream for a request may reach a worker other than the one that
routed it (each Envoy worker thread keeps one stream, on whichever ai-lb worker its
connection landed). That worker forwards the entry, as one datagram on a Unix socket
pair made by the supervisor before the fork, to the worker named in the completion id;
the owner settles it as if it had received the entry itself. Sends never block: a full
socket buffer drops the datagram, and the request's lease ends it instead.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

import orjson

from .completions import Completions, Settled

log = logging.getLogger("ai_lb.workers")
MAX_DATAGRAM = 4096


@dataclass
class WorkerLink:
    """What one worker gets from the supervisor."""

    index: int
    count: int
    table: Any                                   # state.shared_inflight.SharedTable
    inboxes: list[socket.socket] = field(default_factory=list)   # [w]: worker w reads it
    outboxes: list[socket.socket] = field(default_factory=list)  # [w]: others write to it
    nonce: str = ""


def socket_pairs(n: int) -> tuple[list[socket.socket], list[socket.socket]]:
    """(inboxes, outboxes): datagram pairs, one per worker, non-blocking."""
    ins, outs = [], []
    for _ in range(n):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (a, b):
            s.setblocking(False)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            except OSError:
                pass
        ins.append(b)
        outs.append(a)
    return ins, outs


class Forwarder:
    def __init__(self, completions: Completions, link: WorkerLink) -> None:
        """Also installs itself as ``completions.forward``: an entry for another worker's
        request is sent to that worker."""
        self.completions = completions
        completions.forward = self.send
        self.link = link
        self.dropped = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def send(self, worker: int, cid: str, s: Settled) -> bool:
        """To ``worker``'s inbox; False (counted) when it cannot be sent now."""
        if worker == self.link.index or not 0 <= worker < len(self.link.outboxes):
            return False
        try:
            self.link.outboxes[worker].send(orjson.dumps((cid, s.status, s.served, s.first_byte, s.outcome)))
            return True
        except OSError:  # BlockingIOError: the owner is behind (or gone); its lease will end it
            self.dropped += 1
            return False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.link.inboxes[self.link.index].fileno(), self._read)

    def _read(self) -> None:
        inbox = self.link.inboxes[self.link.index]
        settle = self.completions.settle
        for _ in range(1024):   # a bounded batch per wake-up: the loop serves requests in between
            try:
                data = inbox.recv(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as e:
                log.warning("completion inbox failed: %r", e)
                return
            try:
                cid, status, served, first, outcome = orjson.loads(data)
                settle(cid, Settled(status, served, first, outcome))
            except (ValueError, TypeError) as e:
                log.debug("bad forwarded completion: %r", e)

    def close(self) -> None:
        if self._loop is not None:
            try:
                self._loop.remove_reader(self.link.inboxes[self.link.index].fileno())
            except (ValueError, OSError):
                pass
            self._loop = None
