"""ai-lb's gRPC transport: HTTP/2 (h2c, prior knowledge) for Envoy's ext_proc streams.

``h2/`` is a sans-IO HTTP/2 server connection (bytes in, events and bytes out) with
every limit of ``limits.H2Limits`` enforced; ``grpc`` is the (also sans-IO) message
layer; ``server`` runs both on asyncio behind the public API below.
"""

from .grpc import GrpcStatusError
from .h2.frames import PREFACE, frame
from .limits import DEFAULT_LIMITS, H2Limits
from .server import EOF, GrpcError, GrpcServer, GrpcStream

__all__ = ["DEFAULT_LIMITS", "EOF", "PREFACE", "GrpcError", "GrpcServer", "GrpcStatusError", "GrpcStream",
           "H2Limits", "frame"]
