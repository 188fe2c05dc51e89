"""TLS and mTLS on the native transport (and grpcio's), with certificates made here:
handshakes with and without SNI, client certificates required, and reloads that change
the certificate for new connections while open ones keep going."""

import asyncio
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: certs
import certs  # noqa: E402

from extproc.transport import GrpcServer, ReloadingTls, TlsFiles, grpcio_credentials  # noqa: E402

CHECK = "/grpc.health.v1.Health/Check"


async def _check(stream):
    await stream.read()
    await stream.write(health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING))


async def serve(files: TlsFiles, poll: float = 0.05):
    srv = GrpcServer(tls=ReloadingTls(files, poll_interval=poll))
    srv.add_method(CHECK, health_pb2.HealthCheckRequest.FromString, _check)
    return srv, await srv.start("127.0.0.1", 0)


def channel(port: int, roots: bytes, client: tuple[bytes, bytes] | None = None, sni: bool = False):
    creds = grpc.ssl_channel_credentials(root_certificates=roots, private_key=client[1] if client else None,
                                         certificate_chain=client[0] if client else None)
    opts = [("grpc.ssl_target_name_override", certs.SERVER_NAME)] if sni else []
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=opts)


async def healthy(ch, timeout: float = 3.0) -> bool:
    try:
        r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        return r.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.aio.AioRpcError:
        return False


@pytest.mark.asyncio
@pytest.mark.parametrize("sni", [False, True])
async def test_tls_handshake_alpn_h2_and_plaintext_refused(tmp_path, sni):
    ca = certs.CA.make()
    cert, key = certs.write_server(ca, tmp_path)
    srv, port = await serve(TlsFiles(str(cert), str(key)))
    try:
        async with channel(port, ca.pem, sni=sni) as ch:
            assert await healthy(ch)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:  # h2c to a TLS port
            assert not await healthy(ch, timeout=1.0)
        async with channel(port, certs.CA.make("another CA").pem) as ch:  # untrusted server cert
            assert not await healthy(ch, timeout=1.0)
    finally:
        await srv.stop(0.1)


@pytest.mark.asyncio
async def test_mtls_requires_a_client_certificate_from_the_configured_ca(tmp_path):
    ca, clients = certs.CA.make(), certs.CA.make("client CA")
    cert, key = certs.write_server(ca, tmp_path)
    (tmp_path / "clients.pem").write_bytes(clients.pem)
    srv, port = await serve(TlsFiles(str(cert), str(key), str(tmp_path / "clients.pem")))
    try:
        good = clients.issue("envoy", server=False)
        async with channel(port, ca.pem, client=good) as ch:
            assert await healthy(ch)
        async with channel(port, ca.pem) as ch:  # no client certificate
            assert not await healthy(ch, timeout=1.0)
        async with channel(port, ca.pem, client=certs.CA.make("stranger").issue("x", server=False)) as ch:
            assert not await healthy(ch, timeout=1.0)
    finally:
        await srv.stop(0.1)


@pytest.mark.asyncio
async def test_reload_serves_the_new_certificate_to_new_connections_and_keeps_open_ones(tmp_path):
    ca1, ca2 = certs.CA.make("CA one"), certs.CA.make("CA two")
    cert, key = certs.write_server(ca1, tmp_path)
    srv, port = await serve(TlsFiles(str(cert), str(key)))
    tls = srv.tls
    try:
        async with channel(port, ca1.pem + ca2.pem) as kept:
            assert await healthy(kept)
            (conn,) = srv.connections
            certs.write_server(ca2, tmp_path)  # rotate: cert, then key (a poll may see them mismatched)
            for _ in range(100):
                if tls.reloads:
                    break
                await asyncio.sleep(0.02)
            assert tls.reloads == 1
            async with channel(port, ca2.pem) as ch:
                assert await healthy(ch)  # a new handshake gets the new certificate
            async with channel(port, ca1.pem) as ch:
                assert not await healthy(ch, timeout=1.0)  # ... and not the old one
            assert await healthy(kept)  # the open connection carries on, not reconnected
            assert conn in srv.connections and conn.transport is not None and not conn.transport.is_closing()

            # A broken rotation (a key that is not the certificate's) keeps the last good one.
            bad_cert, _ = certs.CA.make("CA three").issue("x", server=True)
            cert.write_bytes(bad_cert)
            for _ in range(100):
                if tls.failures:
                    break
                await asyncio.sleep(0.02)
            assert tls.failures == 1 and tls.reloads == 1
            async with channel(port, ca2.pem) as ch:
                assert await healthy(ch)
    finally:
        await srv.stop(0.1)


def test_bad_files_fail_at_start(tmp_path):
    ca = certs.CA.make()
    cert, _ = certs.write_server(ca, tmp_path)
    with pytest.raises(OSError):
        ReloadingTls(TlsFiles(str(cert), str(tmp_path / "missing.key")))


@pytest.mark.asyncio
async def test_grpcio_server_tls_and_reload(tmp_path):
    ca1, ca2 = certs.CA.make("CA one"), certs.CA.make("CA two")
    cert, key = certs.write_server(ca1, tmp_path)
    from grpc_health.v1 import health

    s = grpc.aio.server()
    hs = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, s)
    await hs.set("", health_pb2.HealthCheckResponse.SERVING)
    port = s.add_secure_port("127.0.0.1:0", grpcio_credentials(TlsFiles(str(cert), str(key)), poll_interval=0.0))
    await s.start()
    try:
        async with channel(port, ca1.pem) as ch:
            assert await healthy(ch)
        certs.write_server(ca2, tmp_path)
        async with channel(port, ca2.pem) as ch:
            assert await healthy(ch)
    finally:
        await s.stop(0.1)
