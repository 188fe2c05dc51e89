"""EDS: ai-lb serves the instances registered with it to Envoy as a cluster's hosts, so
they are routable without editing Envoy's config (``StreamEndpoints``, xDS state of the
world, on ai-lb's own gRPC listener, both transports).

Resource names (``eds_cluster_config.service_name`` in Envoy's cluster):

* ``registered``: every registered instance that can be a destination (decode and mixed;
  prefill servers are reached by the decode side's sidecar, never by Envoy);
* ``registered/prefill``, ``registered/decode``, ``registered/mixed``: one role.

Each host carries the registry's health (HEALTHY / UNHEALTHY), so override_host never
routes to an instance that left rotation and the fallback round robin skips it; Envoy's
own outlier detection applies on top. A change to the registry is pushed at once. Why EDS
and not an ORIGINAL_DST cluster keyed by a header: docs/pd.md.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

import grpc
from envoy.config.core.v3 import address_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ec
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.endpoint.v3 import eds_pb2_grpc
from google.protobuf import any_pb2

from ..config import EndpointsConfig
from ..core import Endpoint
from ..telemetry import RateLimitedLog

log = logging.getLogger("ai_lb.eds")
EOF = grpc.aio.EOF  # both transports end a read with it

METHOD = "/envoy.service.endpoint.v3.EndpointDiscoveryService/StreamEndpoints"
CLA_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
PREFIX = "registered"
MAX_NAMES = 256  # resource names one stream may ask for
_HEALTH = {True: health_check_pb2.HEALTHY, False: health_check_pb2.UNHEALTHY}


def registered_view(directory: Any) -> Callable[[str], tuple[Endpoint, ...] | None]:
    """Resource name -> the registered endpoints it stands for (None: not a name we serve)."""
    cfg = EndpointsConfig(registered=True)

    def view(name: str) -> tuple[Endpoint, ...] | None:
        eps = directory.all_known(cfg)
        if name == PREFIX:
            return tuple(e for e in eps if e.role != "prefill")
        head, _, role = name.partition("/")
        if head == PREFIX and role in ("prefill", "decode", "mixed"):
            return tuple(e for e in eps if (e.role or "mixed") == role)
        return None
    return view


def load_assignment(name: str, eps: tuple[Endpoint, ...]) -> endpoint_pb2.ClusterLoadAssignment:
    lbs = []
    for e in eps:
        host, _, port = e.address.rpartition(":")
        lbs.append(ec.LbEndpoint(endpoint=ec.Endpoint(address=address_pb2.Address(socket_address=address_pb2.SocketAddress(
            address=host.strip("[]"), port_value=int(port)))), health_status=_HEALTH[e.healthy]))
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=[ec.LocalityLbEndpoints(lb_endpoints=lbs)])


class _Stream:
    __slots__ = ("names", "eof", "wake", "asked")

    def __init__(self) -> None:
        self.names: tuple[str, ...] = ()
        self.eof = False
        self.wake = asyncio.Event()
        self.asked = False  # Envoy asked for a new set of names: answer even if nothing changed


class EdsService:
    def __init__(self, view: Callable[[str], tuple[Endpoint, ...] | None]) -> None:
        self.view = view
        self._streams: set[_Stream] = set()
        self._log = RateLimitedLog(30.0)

    def changed(self) -> None:
        """The registry changed: every open stream re-sends what changed for it."""
        for s in self._streams:
            s.wake.set()

    async def stream(self, st: Any) -> None:
        """One ``StreamEndpoints`` call (a native ``GrpcStream`` or a grpcio context)."""
        state = _Stream()
        self._streams.add(state)
        reader = asyncio.get_running_loop().create_task(self._read(st, state))
        sent: dict[str, tuple[Endpoint, ...]] | None = None
        n = 0
        try:
            while True:
                await state.wake.wait()
                state.wake.clear()
                if state.eof:
                    return
                want = {name: eps for name in state.names if (eps := self.view(name)) is not None}
                if state.asked:
                    state.asked, sent = False, None
                if want == sent or not want:  # nothing new, or nothing we serve
                    continue
                n += 1
                resources = []
                for name, eps in want.items():
                    a = any_pb2.Any()
                    a.Pack(load_assignment(name, eps))
                    resources.append(a)
                await st.write(discovery_pb2.DiscoveryResponse(version_info=str(n), resources=resources,
                                                               type_url=CLA_TYPE, nonce=str(n)))
                sent = want
        finally:
            self._streams.discard(state)
            reader.cancel()

    async def _read(self, st: Any, state: _Stream) -> None:
        try:
            while True:
                req = await st.read()
                if req is EOF:
                    break
                if req.HasField("error_detail"):  # a NACK: Envoy keeps the last good assignment
                    self._log.warn(("eds", "nack"), "Envoy rejected an EDS update: %.200s", req.error_detail.message)
                if req.type_url and req.type_url != CLA_TYPE:
                    continue
                names = tuple(dict.fromkeys(req.resource_names))[:MAX_NAMES]
                if names != state.names:
                    unknown = [x for x in names if self.view(x) is None]
                    if unknown:
                        self._log.warn(("eds", "unknown"), "EDS: Envoy asks for %s, which ai-lb does not serve "
                                       "(names: registered, registered/<role>)", ", ".join(unknown[:5]))
                    state.names = names
                    state.asked = True
                    state.wake.set()
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a broken stream ends the call
            pass
        state.eof = True
        state.wake.set()


class GrpcioEds(eds_pb2_grpc.EndpointDiscoveryServiceServicer):
    """The same service on the grpcio transport (``server.transport: grpcio``)."""

    def __init__(self, svc: EdsService) -> None:
        self.svc = svc

    async def StreamEndpoints(self, request_iterator, context) -> None:  # noqa: N802 - gRPC name
        await self.svc.stream(context)
