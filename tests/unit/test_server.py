"""The gateway process in-process: what it logs at start-up and on reloads.

Logs go to operators' log stores, so they must never carry a Redis password or a file's
raw bytes, and a broken or empty file must never replace the running config.
"""

from __future__ import annotations

import logging

import pytest

from extproc.server import Gateway

ROUTE = "routes: {llm: {lb_policy: round_robin, endpoints: {static: ['127.0.0.1:9']}}}\n"
SERVER = "server: {listen: '127.0.0.1:0', metrics_listen: '127.0.0.1:0', reload_interval: 60}\n"


async def _gateway(tmp_path, text: str) -> Gateway:
    p = tmp_path / "ai-lb.yaml"
    p.write_text(text)
    gw = Gateway(p)
    await gw.start()
    return gw


@pytest.mark.asyncio
async def test_startup_log_redacts_the_store_password_and_warns_when_redis_does_not_answer(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ai_lb")
    gw = await _gateway(tmp_path, SERVER + "store: redis://:hunter2@127.0.0.1:1/0\n"
                        "routes: {llm: {lb_policy: global_least_request, endpoints: {static: ['127.0.0.1:9']}}}\n")
    try:
        text = caplog.text
        assert "hunter2" not in text
        assert "store=redis://:***@127.0.0.1:1/0" in text
        assert "redis redis://:***@127.0.0.1:1/0 does not answer at start-up (ConnectionRefusedError" in text
    finally:
        await gw.stop()


@pytest.mark.asyncio
async def test_unresolvable_redis_host_is_a_startup_warning(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ai_lb")
    gw = await _gateway(tmp_path, SERVER + "routes: {llm: {lb_policy: prefix_cache, lb_config: "
                        "{serviceFQDN: redis.invalid, password: hunter2}, endpoints: {static: ['127.0.0.1:9']}}}\n")
    try:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("redis redis://:***@redis.invalid:6379/0 does not answer at start-up" in w for w in warnings), warnings
        assert "hunter2" not in caplog.text
        # The start-up line names the Redis the route uses, not only the global store=memory.
        assert "store=memory, redis in use: redis://:***@redis.invalid:6379/0" in caplog.text
    finally:
        await gw.stop()


@pytest.mark.asyncio
@pytest.mark.parametrize("content", [b"", b"\n", b"# truncated\n", b"server: {}\n", b"routes: {}\n",
                                     b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, b"routes:\x00\x01\x02 binary",
                                     b"store: redis://:hunter2@x/0\nroutes: {llm: [\n"])
async def test_a_reload_of_an_empty_truncated_or_binary_file_keeps_the_running_config(tmp_path, caplog, content):
    gw = await _gateway(tmp_path, SERVER + ROUTE)
    try:
        caplog.clear()
        gw.config_path.write_bytes(content)
        assert await gw.reload("test") is False
        assert list(gw.runtime.routes) == ["llm"] and list(gw.config.routes) == ["llm"]
        (rec,) = [r for r in caplog.records if r.levelno == logging.ERROR]
        msg = rec.getMessage()
        assert msg.startswith("config reload (test) rejected, keeping the running config:")
        assert "hunter2" not in msg and "PNG" not in msg and "\\x" not in msg and "\x00" not in msg
        assert len(msg) < 400
    finally:
        await gw.stop()


@pytest.mark.asyncio
async def test_failed_auth_is_a_startup_warning_without_the_password(tmp_path, caplog):
    from aibench.redis_server import RedisServer

    srv = RedisServer(tmp_path, args=["--requirepass", "right"]).start()
    caplog.set_level(logging.INFO, logger="ai_lb")
    try:
        gw = await _gateway(tmp_path, SERVER + f"store: redis://:wrong-hunter2@127.0.0.1:{srv.port}/0\n"
                            "routes: {llm: {lb_policy: global_least_request, endpoints: {static: ['127.0.0.1:9']}}}\n")
        try:
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any("does not answer at start-up (RespError: WRONGPASS" in w for w in warnings), warnings
            assert "hunter2" not in caplog.text
        finally:
            await gw.stop()
    finally:
        srv.kill()
