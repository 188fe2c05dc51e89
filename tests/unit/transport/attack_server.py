"""The server the attack tests hit: extproc.transport with small limits and timeouts,
an echo ext_proc method and the gRPC health check, on loopback, in its own process (so
its memory can be measured and a wedged server fails the tests instead of hanging them).

    python attack_server.py PORT_FILE     # writes the port, serves for at most 120 s
"""

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb  # noqa: E402
from grpc_health.v1 import health_pb2  # noqa: E402

from extproc.transport import EOF, GrpcServer, H2Limits  # noqa: E402

PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
LIMITS = H2Limits(max_frame_size=1 << 14, max_header_list_size=16 << 10, max_header_block=16 << 10,
                  max_concurrent_streams=100, stream_window=64 << 10, connection_window=2 << 20,
                  max_message_size=1 << 20, max_resets_per_second=200, max_pings_per_second=50,
                  max_settings_per_second=50, handshake_timeout=1.0, idle_timeout=1.5)


async def process(stream):
    while (req := await stream.read()) is not EOF:
        await stream.write(pb.ProcessingResponse(request_body=pb.BodyResponse(
            response=pb.CommonResponse(body_mutation=pb.BodyMutation(body=req.request_body.body[:16])))))


async def check(stream):
    await stream.read()
    await stream.write(health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING))


async def main(port_file: str) -> None:
    srv = GrpcServer(LIMITS)
    srv.add_method(PROCESS, pb.ProcessingRequest.FromString, process)
    srv.add_method("/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest.FromString, check)
    port = await srv.start("127.0.0.1", 0)
    Path(port_file).write_text(str(port))
    await asyncio.sleep(120)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(sys.argv[1]))
