"""EDS as ai-lb serves it: the registered instances as ClusterLoadAssignments, pushed when
the registry changes, ACKs and NACKs, unknown names (a stand-in stream; Envoy itself
consumes it in tests/e2e/test_pd.py)."""

import asyncio

import grpc
import pytest
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest

from extproc.config.sources import REGISTERED
from extproc.core import Endpoint, EndpointDirectory
from extproc.envoy.eds import CLA_TYPE, EdsService, registered_view


class FakeStream:
    def __init__(self):
        self.inq, self.out = asyncio.Queue(), asyncio.Queue()

    async def read(self):
        return await self.inq.get()

    async def write(self, m):
        await self.out.put(m)

    async def response(self, timeout=1.0):
        return await asyncio.wait_for(self.out.get(), timeout)


def hosts(resp):
    out = {}
    for any_ in resp.resources:
        cla = endpoint_pb2.ClusterLoadAssignment()
        any_.Unpack(cla)
        out[cla.cluster_name] = sorted((f"{e.endpoint.address.socket_address.address}:"
                                        f"{e.endpoint.address.socket_address.port_value}", e.health_status)
                                       for loc in cla.endpoints for e in loc.lb_endpoints)
    return out


@pytest.mark.asyncio
async def test_registered_instances_are_served_and_changes_pushed():
    d = EndpointDirectory()
    d.update_clusters({REGISTERED: (Endpoint("10.0.0.1:80", True, "prefill"), Endpoint("10.0.0.2:80", True, "decode"),
                                    Endpoint("[::1]:81", False, "mixed"))}, source="registry")
    svc = EdsService(registered_view(d))
    st = FakeStream()
    task = asyncio.create_task(svc.stream(st))
    await st.inq.put(DiscoveryRequest(type_url=CLA_TYPE, resource_names=["registered", "registered/prefill"]))
    r = await st.response()
    assert r.type_url == CLA_TYPE and r.nonce == r.version_info == "1"
    assert hosts(r) == {"registered": [("10.0.0.2:80", 1), ("::1:81", 2)],   # HEALTHY, UNHEALTHY; no prefill server
                        "registered/prefill": [("10.0.0.1:80", 1)]}
    await st.inq.put(DiscoveryRequest(type_url=CLA_TYPE, resource_names=["registered", "registered/prefill"],
                                      version_info="1", response_nonce="1"))  # the ACK: nothing to send
    svc.changed()  # a change elsewhere in the directory: the same assignment, nothing to send either
    with pytest.raises(asyncio.TimeoutError):
        await st.response(0.1)
    d.update_clusters({REGISTERED: (Endpoint("10.0.0.2:80", False, "decode"),)}, source="registry")
    svc.changed()
    r = await st.response()
    assert r.nonce == "2" and hosts(r) == {"registered": [("10.0.0.2:80", 2)], "registered/prefill": []}
    nack = DiscoveryRequest(type_url=CLA_TYPE, resource_names=["registered", "registered/prefill"], response_nonce="2")
    nack.error_detail.message = "rejected"
    await st.inq.put(nack)
    await st.inq.put(DiscoveryRequest(type_url=CLA_TYPE, resource_names=["nobody"]))  # a name we do not serve
    with pytest.raises(asyncio.TimeoutError):
        await st.response(0.1)
    await st.inq.put(grpc.aio.EOF)
    await asyncio.wait_for(task, 1)  # the call ends with Envoy's side


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["native", "grpcio"])
async def test_the_gateway_serves_eds_on_its_grpc_port_with_both_transports(tmp_path, transport):
    from envoy.service.endpoint.v3 import eds_pb2_grpc

    from extproc.server import Gateway

    p = tmp_path / "ai-lb.yaml"
    p.write_text(f"server: {{listen: '127.0.0.1:0', metrics_listen: '127.0.0.1:0', transport: {transport}}}\n"
                 "registration: {listen: '127.0.0.1:0'}\n"
                 "routes: {llm: {lb_policy: pd, endpoints: {registered: true}}}\n")
    gw = Gateway(p)
    await gw.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.grpc_port}") as ch:
            call = eds_pb2_grpc.EndpointDiscoveryServiceStub(ch).StreamEndpoints()
            await call.write(DiscoveryRequest(type_url=CLA_TYPE, resource_names=["registered"]))
            assert hosts(await asyncio.wait_for(call.read(), 5)) == {"registered": []}  # nothing registered yet
            # the registry publishes an instance (as a registration would): Envoy is told at once
            gw.directory.update_clusters({REGISTERED: (Endpoint("10.9.9.9:8000", True, "decode"),)}, source="registry")
            gw._discovery_changed()
            r = await asyncio.wait_for(call.read(), 5)
            call.cancel()
        assert hosts(r) == {"registered": [("10.9.9.9:8000", 1)]}
    finally:
        await gw.stop()
