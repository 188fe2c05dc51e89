"""Compatibility alias: the gRPC/HTTP2 transport now lives in ``extproc.transport``
(a sans-IO HTTP/2 core with enforced limits, see docs/transport.md)."""

from .transport import EOF, PREFACE, GrpcError, GrpcServer, GrpcStream, H2Limits, frame

__all__ = ["EOF", "PREFACE", "GrpcError", "GrpcServer", "GrpcStream", "H2Limits", "frame"]
