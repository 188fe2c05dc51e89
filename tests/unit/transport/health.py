"""Is a live ai-lb transport serving? The gRPC health check, as Envoy's would ask it."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def health_ok(port: int, timeout: float = 2.0) -> bool:
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        return r.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False
    finally:
        ch.close()
