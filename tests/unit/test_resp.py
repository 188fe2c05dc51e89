"""The minimal Redis client against a real redis-server."""

import asyncio

import pytest

from extproc.state.resp import RespClient, RespError, encode
from aibench.redis_server import RedisServer


def test_encoding():
    assert encode(("SET", "k", b"v", 12)) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n$2\r\n12\r\n"


@pytest.mark.asyncio
async def test_commands_scripts_errors_pipelining_and_reconnect(tmp_path):
    srv = RedisServer(tmp_path).start()
    try:
        c = RespClient.from_url(srv.url.replace("/0", "/3"))
        assert await c.ping() == b"PONG"
        assert await c.execute("SET", "k", "v") == b"OK"
        assert await c.execute("GET", "k") == b"v"
        assert await c.execute("GET", "missing") is None
        await c.execute("HSET", "h", "a", 1, "b", 2)
        assert await c.hgetall("h") == {b"a": b"1", b"b": b"2"}
        assert await c.hmget("h", ["b", "zz"]) == [b"2", None]
        s = c.register_script("return {KEYS[1], ARGV[1] + 1, false}")
        assert await s(keys=["x"], args=[41]) == [b"x", 42, None]  # a Lua false is a nil reply
        assert await s(keys=["x"], args=[1]) == [b"x", 2, None]    # second call: EVALSHA hits
        with pytest.raises(RespError, match="WRONGTYPE"):
            await c.execute("GET", "h")
        # Many concurrent calls on one connection get their own replies.
        got = await asyncio.gather(*(c.execute("ECHO", str(i)) for i in range(300)))
        assert got == [str(i).encode() for i in range(300)]
        # The URL's database is used.
        assert await c.execute("CLIENT", "INFO") and b"db=3" in await c.execute("CLIENT", "INFO")
        # A restart drops the connection; the next call reconnects.
        srv.restart()
        with pytest.raises(ConnectionError):
            await c.ping()
        assert await c.ping() == b"PONG"
        await c.aclose()
    finally:
        srv.kill()


def _clients(admin: RespClient):
    return admin.execute("CLIENT", "LIST")


@pytest.mark.asyncio
async def test_failed_auth_is_reported_and_closes_the_socket(tmp_path):
    srv = RedisServer(tmp_path, args=["--requirepass", "right"]).start()
    try:
        admin = RespClient.from_url(f"redis://:right@127.0.0.1:{srv.port}/0")
        bad = RespClient.from_url(f"redis://:wrong@127.0.0.1:{srv.port}/0")
        for _ in range(3):
            with pytest.raises(RespError, match="WRONGPASS|invalid password"):
                await bad.ping()
        await asyncio.sleep(0.1)
        listing = (await _clients(admin)).decode()
        assert len(listing.strip().splitlines()) == 1, listing  # only the admin connection is left
        await admin.aclose()
    finally:
        srv.kill()


@pytest.mark.asyncio
async def test_unix_socket_url(tmp_path):
    sock = tmp_path / "redis.sock"
    srv = RedisServer(tmp_path, args=["--unixsocket", str(sock), "--unixsocketperm", "700",
                                      "--requirepass", "pw"]).start()
    try:
        c = RespClient.from_url(f"unix://:pw@{sock}?db=2")
        assert await c.execute("SET", "k", "v") == b"OK"
        info = await c.execute("CLIENT", "INFO")
        assert b" db=2 " in info and b" flags=U " in info  # U: a unix-socket client
        await c.aclose()
    finally:
        srv.kill()


def _self_signed(tmp_path):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return key, cert


@pytest.mark.asyncio
async def test_tls_url_verifies_the_server(tmp_path):
    from aibench.devstack import free_ports

    key, cert = _self_signed(tmp_path)
    tls_port = free_ports(1)[0]
    srv = RedisServer(tmp_path, port=free_ports(1)[0], wait_for=tls_port,
                      args=["--tls-port", str(tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                            "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--requirepass", "pw"]).start()
    try:
        c = RespClient.from_url(f"rediss://:pw@127.0.0.1:{tls_port}/1?ssl_ca_certs={cert}")
        assert await c.ping() == b"PONG"
        assert b"db=1" in await c.execute("CLIENT", "INFO")
        await c.aclose()
        # Without the CA the self-signed certificate is refused; ssl_cert_reqs=none opts out.
        import ssl

        with pytest.raises(ssl.SSLError):
            await RespClient.from_url(f"rediss://:pw@127.0.0.1:{tls_port}/0").ping()
        c = RespClient.from_url(f"rediss://:pw@127.0.0.1:{tls_port}/0?ssl_cert_reqs=none")
        assert await c.ping() == b"PONG"
        await c.aclose()
        # Plain TCP to the TLS port does not pass for a connection.
        with pytest.raises((ConnectionError, asyncio.TimeoutError, RespError)):
            await RespClient.from_url(f"redis://:pw@127.0.0.1:{tls_port}/0", connect_timeout=0.5).ping()
    finally:
        srv.kill()
