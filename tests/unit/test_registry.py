"""Registration, FastDeploy-compatible: InstanceInfo validation, the API's status codes and
token, health thresholds (out after the failure threshold, back after the success
threshold), register.yaml, and one registry shared by replicas through a real Redis."""

import asyncio
import textwrap

import aiohttp
import pytest
from aiohttp import web

from aibench.redis_server import RedisServer
from extproc.config import ConfigError, EndpointsConfig, RegistrationConfig
from extproc.core import Endpoint, EndpointDirectory
from extproc.discovery.instances import parse_instance
from extproc.discovery.register_api import RegisterApi
from extproc.discovery.registry import RegistrySource
from extproc.runtime import parse_config
from extproc.state.redis_conn import RedisConn
from extproc.state.registry_store import MemoryRegistry, RedisRegistry

REGISTERED = EndpointsConfig(registered=True)


def test_instance_info_is_validated_as_fastdeploy_does_every_problem_at_once():
    inst, problems = parse_instance({"role": "Prefill", "host_ip": "http://10.0.0.7", "port": "8097",
                                     "connector_port": 8001, "transfer_protocol": ["ipc", "rdma"],
                                     "rdma_ports": [7100, "7101"], "device_ids": [0, "1"], "tp_size": 4})
    assert problems == [] and inst.address == "10.0.0.7:8097" and inst.role == "prefill"
    assert inst.metrics_port == 8097 and inst.rdma_ports == ("7100", "7101") and inst.device_ids == ("0", "1")
    assert parse_instance({"role": 2, "host_ip": "::1", "port": 1})[0].address == "[::1]:1"  # FastDeploy's numbers
    _, problems = parse_instance({"role": "leader", "host_ip": "vllm.local", "port": 0, "metrics_port": "x",
                                  "transfer_protocol": ["tcp"], "rdma_ports": [70000]})
    assert problems == ["invalid role 'leader'; allowed: prefill, decode, mixed",
                        "invalid host_ip 'vllm.local': expected an IP address", "invalid port 0",
                        "invalid metrics_port 'x'", "invalid transfer_protocol 'tcp'; allowed: ipc, rdma",
                        "rdma_ports[0]: invalid port 70000"]
    assert parse_instance([1])[1] == ["expected a JSON object with role, host_ip and port"]


def test_registration_config_off_loopback_needs_a_token(tmp_path, monkeypatch):
    def problems(block: str) -> list[str]:
        with pytest.raises(ConfigError) as e:
            parse_config(textwrap.dedent(f"""
                registration: {block}
                routes: {{llm: {{lb_policy: pd, endpoints: {{registered: true}}}}}}
                """))
        return e.value.problems
    assert problems("{listen: '0.0.0.0:30000'}")[0].startswith("registration.listen: a registration API off loopback "
                                                              "needs a bearer token")
    assert problems(f"{{token_file: {tmp_path}/missing}}") == [
        "registration.token_file: cannot read the token file (FileNotFoundError)"]
    assert problems("{token_env: NO_SUCH_VAR_HERE, health-failure-threshold: 0}") == [
        "registration.token_env: the environment variable is unset or empty",
        "registration.health_failure_threshold: must be >= 1"]
    monkeypatch.setenv("AI_LB_TEST_TOKEN", "t0k")
    c = parse_config(textwrap.dedent("""
        registration: {listen: '0.0.0.0:30000', token_env: AI_LB_TEST_TOKEN, health-check-interval-secs: 2}
        routes: {llm: {lb_policy: pd, endpoints: {registered: true}}}
        """))
    assert c.registration.token() == "t0k" and c.registration.health_check_interval_secs == 2


class Backend:
    """A health endpoint whose answer the test sets."""

    def __init__(self):
        self.status = 200

    async def __aenter__(self):
        app = web.Application()
        async def health(request):
            return web.Response(status=self.status)
        app.router.add_get("/health", health)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


def source(store=None, directory=None, **cfg):
    cfg = RegistrationConfig(**{"health_check_interval_secs": 60, "health_check_timeout_secs": 0.5,
                                "health_failure_threshold": 2, "health_success_threshold": 2, **cfg})
    changes = []
    src = RegistrySource(cfg, store or MemoryRegistry(), directory or EndpointDirectory(), lambda: changes.append(1),
                         poll_interval=60)
    return src, changes


def inst(port, role="decode"):
    return parse_instance({"role": role, "host_ip": "127.0.0.1", "port": port})[0]


@pytest.mark.asyncio
async def test_thresholds_take_an_instance_out_and_bring_it_back():
    async with Backend() as b:
        src, changes = source()
        await src.start()
        try:
            await src.register(inst(b.port))
            assert src.directory.candidates(REGISTERED) == (Endpoint(f"127.0.0.1:{b.port}", True, "decode"),)
            b.status = 500
            await src.check_round()
            assert src.directory.candidates(REGISTERED) != ()  # one failure: still in rotation
            await src.check_round()
            assert src.directory.candidates(REGISTERED) == ()  # the failure threshold: out
            assert src.listing()["decode"][0]["healthy"] is False
            b.status = 200
            await src.check_round()
            assert src.directory.candidates(REGISTERED) == ()  # one success of two
            await src.check_round()
            assert len(src.directory.candidates(REGISTERED)) == 1  # back
            assert changes  # the gateway heard of every change (EDS, policies)
        finally:
            await src.stop()


@pytest.mark.asyncio
async def test_unhealthy_instances_are_removed_after_the_grace_when_set():
    async with Backend() as b:
        src, _ = source(health_failure_threshold=1, remove_unhealthy_after_secs=0.05)
        await src.start()
        try:
            await src.register(inst(b.port))
            b.status = 503
            await src.check_round()
            await asyncio.sleep(0.1)
            await src.check_round()
            assert src.instances == {} and await src.store.all() == {}
        finally:
            await src.stop()


@pytest.mark.asyncio
async def test_register_yaml_joins_once_healthy_and_bad_entries_are_skipped(tmp_path, caplog):
    async with Backend() as b:
        f = tmp_path / "register.yaml"
        f.write_text(textwrap.dedent(f"""
            instances:
              - role: "prefill"
                host_ip: 127.0.0.1
                port: {b.port}
                connector_port: 8001
                transfer_protocol: [ipc, rdma]
                rdma_ports: [7100, "7101"]
                device_ids: [0, "1"]
                metrics_port: 8003
              - role: "sideways"
                host_ip: 127.0.0.1
                port: 8098
            """))
        src, _ = source(register_path=str(f), health_success_threshold=1)
        await src.start()
        try:
            assert "instances[1] skipped: invalid role 'sideways'" in caplog.text
            assert src.listing()["prefill"][0]["healthy"] is False  # not checked yet
            await src.check_round()
            (w,) = src.listing()["prefill"]
            assert w["healthy"] is True and w["url"] == f"http://127.0.0.1:{b.port}" and w["metrics_port"] == "8003"
        finally:
            await src.stop()


@pytest.mark.asyncio
async def test_the_api_speaks_fastdeploy_and_refuses_without_changing_anything():
    async with Backend() as b:
        src, _ = source(max_instances=1, health_success_threshold=1)
        await src.start()
        api = RegisterApi(src, "127.0.0.1:0", "tok")
        port = await api.start()
        url = f"http://127.0.0.1:{port}"
        auth = {"Authorization": "Bearer tok"}
        try:
            async with aiohttp.ClientSession() as s:
                async def post(doc=None, headers=auth, data=None):
                    async with s.post(url + "/register", json=doc, data=data, headers=headers) as r:
                        return r.status, await r.json()
                ok = {"role": "mixed", "host_ip": "127.0.0.1", "port": b.port}
                assert await post(ok, headers={}) == (401, {"code": 401, "msg": "missing or invalid bearer token"})
                assert (await post(ok, headers={"Authorization": "Bearer nope"}))[0] == 401
                assert (await post(data=b"x" * 70000))[0] == 413
                assert (await post({"role": "mixed"}))[0] == 400
                assert await post(ok) == (200, {"code": 200, "msg": "Register success"})
                assert await post({**ok, "port": b.port + 1}) == (409, {
                    "code": 409, "msg": "the registry holds 1 instances (registration.max_instances)"})
                async with s.get(url + "/registered_number", headers=auth) as r:
                    assert await r.json() == {"prefill": 0, "decode": 0, "mixed": 1}
                async with s.get(url + "/registered", headers=auth) as r:
                    doc = await r.json()
                    assert doc["code"] == 200 and doc["msg"] == "success"
                    assert doc["mixed"][0]["worker_type"] == "mixed" and doc["mixed"][0]["healthy"] is True
                b.status = 500
                async with s.get(url + "/health_generate", headers=auth) as r:
                    assert await r.json() == {"code": 200, "msg": "Health check complete", "healthy": [],
                                              "unhealthy": [f"http://127.0.0.1:{b.port}"]}
                assert src.listing()["mixed"][0]["healthy"] is True  # a report, not a check round
            assert src.events.labels("rejected_unauthorized")._value.get() == 2
        finally:
            await api.stop()
            await src.stop()


@pytest.fixture
def redis_srv(tmp_path):
    srv = RedisServer(tmp_path).start()
    yield srv
    srv.kill()


@pytest.mark.asyncio
async def test_replicas_share_one_registry_through_redis(redis_srv):
    async with Backend() as b:
        conns = [RedisConn(redis_srv.url, 0.2, cooldown=0.2) for _ in range(2)]
        a, _ = source(RedisRegistry(conns[0], "t:registry"), health_success_threshold=1)
        other, _ = source(RedisRegistry(conns[1], "t:registry"), health_success_threshold=1)
        await a.start()
        await other.start()
        try:
            await a.register(inst(b.port, "prefill"))
            assert other.directory.all_known(REGISTERED) == ()
            await other.poll()  # every discovery interval
            assert other.directory.all_known(REGISTERED) == (Endpoint(f"127.0.0.1:{b.port}", True, "prefill"),)
            redis_srv.kill()
            await other.poll()  # Redis gone: the last view stays
            assert len(other.directory.all_known(REGISTERED)) == 1
            with pytest.raises(Exception) as e:
                await a.register(inst(b.port, "decode"))  # healthy, but the store cannot take it
            assert (getattr(e.value, "status", None), str(e.value)) == (503, "the registry store is unavailable; try again")
            assert a.listing()["prefill"] and not a.listing()["decode"]  # nothing half-written
        finally:
            await a.stop()
            await other.stop()
            for c in conns:
                await c.close()


@pytest.mark.asyncio
async def test_a_reload_that_changes_registration_keeps_the_instances(tmp_path):
    from extproc.server import Gateway

    async with Backend() as b:
        p = tmp_path / "ai-lb.yaml"
        text = ("server: {listen: '127.0.0.1:0', metrics_listen: '127.0.0.1:0', reload_interval: 60}\n"
                "registration: {listen: '127.0.0.1:0', health-success-threshold: %d}\n"
                "routes: {llm: {lb_policy: pd, endpoints: {registered: true}}}\n")
        p.write_text(text % 1)
        gw = Gateway(p)
        await gw.start()
        try:
            async with aiohttp.ClientSession() as s:
                async with s.post(f"http://127.0.0.1:{gw.sources.api.port}/register",
                                  json={"role": "decode", "host_ip": "127.0.0.1", "port": b.port}) as r:
                    assert r.status == 200
                p.write_text(text % 2)
                assert await gw.reload("test")
                assert gw.sources.registry.cfg.health_success_threshold == 2  # restarted with the new settings
                async with s.get(f"http://127.0.0.1:{gw.sources.api.port}/registered_number") as r:
                    assert await r.json() == {"prefill": 0, "decode": 1, "mixed": 0}
            assert [e.address for e in gw.runtime.routes["llm"].candidates(gw.directory)] == [f"127.0.0.1:{b.port}"]
        finally:
            await gw.stop()
