"""The gateway's gRPC health services: liveness at once; readiness, "" and the ext_proc
service only after the first endpoint discovery (here from a Kubernetes API server that
fails at first), NOT_SERVING again once shutdown starts; on the main port (over TLS
here) and on the plaintext health port for kubelet probes."""

import asyncio
import sys
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: kube_api, certs
import certs  # noqa: E402
import kube_api as k  # noqa: E402

from extproc.config import EndpointsConfig, KubernetesEndpoints  # noqa: E402
from extproc.server import Gateway  # noqa: E402

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


async def status(ch, service: str) -> int:
    return (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=2)).status


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["native", "grpcio"])
async def test_readiness_waits_for_the_first_discovery_and_ends_with_shutdown(tmp_path, monkeypatch, transport):
    api = k.FakeKubeAPI()
    await api.start()
    api.put(k.POD, k.pod("a", "10.0.0.1", {"app": "vllm"}))
    api.fail_next = [503] * 1000  # the API server is not answering yet
    (tmp_path / "kubeconfig").write_text(api.kubeconfig("llm"))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    ca = certs.CA.make()
    cert, key = certs.write_server(ca, tmp_path)
    cfg = tmp_path / "ai-lb.yaml"
    cfg.write_text(yaml.safe_dump({
        "server": {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "health_listen": "127.0.0.1:0",
                   "transport": transport, "tls": {"cert": str(cert), "key": str(key)}},
        "routes": {"llm": {"lb_policy": "round_robin",
                           "endpoints": {"kubernetes": {"selector": {"app": "vllm"}, "port": 8000}}}}}))
    gw = Gateway(cfg)
    await gw.start()
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=ca.pem)
        async with grpc.aio.secure_channel(f"127.0.0.1:{gw.grpc_port}", creds) as tls_ch, \
                grpc.aio.insecure_channel(f"127.0.0.1:{gw.health_port}") as probe_ch:
            for ch in (tls_ch, probe_ch):
                assert await status(ch, "liveness") == SERVING
                for svc in ("readiness", "", "envoy.service.ext_proc.v3.ExternalProcessor"):
                    assert await status(ch, svc) == NOT_SERVING
            await asyncio.sleep(0.3)
            assert await status(probe_ch, "readiness") == NOT_SERVING  # still failing: still not ready
            api.fail_next = []
            for _ in range(300):
                if await status(probe_ch, "readiness") == SERVING:
                    break
                await asyncio.sleep(0.05)
            for ch in (tls_ch, probe_ch):
                for svc in ("readiness", "", "envoy.service.ext_proc.v3.ExternalProcessor", "liveness"):
                    assert await status(ch, svc) == SERVING
            target = KubernetesEndpoints(selector=(("app", "vllm"),), port=8000)
            assert [e.address for e in gw.directory.candidates(EndpointsConfig(kubernetes=target))] == ["10.0.0.1:8000"]
            with pytest.raises(grpc.aio.AioRpcError):
                await status(probe_ch, "nonexistent")
    finally:
        stopping = asyncio.create_task(gw.stop(grace=0.2))
        await asyncio.sleep(0)
        assert gw.health.status["readiness"] == NOT_SERVING and gw.health.status["liveness"] == SERVING
        await stopping
        await api.stop()
