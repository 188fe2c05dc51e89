"""An in-memory ext_proc stream for tests that drive ``Processor.Process`` directly: it
hands out the given messages, then (unless held) EOF, and keeps what ai-lb wrote."""

from __future__ import annotations

import asyncio

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2


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


def headers_msg(route: str = "llm", eos: bool = False, **hdrs: str) -> pb.ProcessingRequest:
    """A request-headers message for ``route`` (Envoy's ``xds.route_name`` attribute): a
    POST to /v1/chat/completions with ``hdrs`` added; ``eos``: no body follows."""
    h = pb.HttpHeaders(end_of_stream=eos)
    for k, v in {":method": "POST", ":path": "/v1/chat/completions", **hdrs}.items():
        h.headers.headers.append(base_pb2.HeaderValue(key=k, raw_value=v.encode()))
    req = pb.ProcessingRequest(request_headers=h)
    s = struct_pb2.Struct()
    s.fields["xds.route_name"].string_value = route
    req.attributes["envoy.filters.http.ext_proc"].CopyFrom(s)
    return req
