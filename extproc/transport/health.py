"""The gRPC health service (grpc.health.v1) for both transports, with the services the
GIE endpoint-picker protocol names: ``liveness`` (the process answers), ``readiness``
(ready for traffic: the first endpoint discovery is done and no shutdown has started),
and ``""`` plus the ext_proc service name, which follow readiness (Envoy's own health
check asks for ``""``)."""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2

from .grpc import NOT_FOUND, INTERNAL
from .server import EOF, GrpcError, GrpcServer

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
CHECK_METHOD = "/grpc.health.v1.Health/Check"
LIVENESS, READINESS = "liveness", "readiness"
READY_SERVICES = ("", EXT_PROC_SERVICE, READINESS)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()  # the grpcio transport's
        self.status: dict[str, int] = {}              # the native transport's
        self.live = self.ready = False

    async def set(self, live: bool, ready: bool) -> None:
        self.live, self.ready = live, ready
        for svc, ok in ((LIVENESS, live), *((s, ready) for s in READY_SERVICES)):
            self.status[svc] = SERVING if ok else NOT_SERVING
            await self.servicer.set(svc, SERVING if ok else NOT_SERVING)

    async def check(self, stream) -> None:
        """``Health/Check`` on the native transport."""
        req = await stream.read()
        if req is EOF:
            raise GrpcError(INTERNAL, "no request message")
        status = self.status.get(req.service)
        if status is None:
            raise GrpcError(NOT_FOUND, f"unknown service {req.service!r}")
        await stream.write(health_pb2.HealthCheckResponse(status=status))

    def serve_on(self, srv: GrpcServer) -> None:
        srv.add_method(CHECK_METHOD, health_pb2.HealthCheckRequest.FromString, self.check)
