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
