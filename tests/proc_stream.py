"""An in-memory ext_proc stream for tests that drive ``Processor.Process`` directly: it
hands out the given messages, then (unless held) EOF, and keeps what ai-lb wrote."""

from __future__ import annotations

import asyncio

import grpc


class Stream:
    def __init__(self, msgs, hold=False):
        self.msgs, self.out, self.hold = list(msgs), [], asyncio.Event()
        if not hold:
            self.hold.set()

    async def read(self):
        if self.msgs:
            return self.msgs.pop(0)
        await self.hold.wait()
        return grpc.aio.EOF

    async def write(self, m):
        self.out.append(m)
