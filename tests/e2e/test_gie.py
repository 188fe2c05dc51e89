"""The GIE endpoint-picker protocol through a real Envoy 1.40, configured as a GIE
gateway would be: request bodies FULL_DUPLEX_STREAMED, ai-lb reached over mTLS, a subset
hint set per route (set_metadata), a retry policy that walks ai-lb's fallback list, and
override_host reporting the endpoint that served. 200 KB prompts throughout.

The last tests replay GIE conformance cases (GatewayFollowingEPPRouting,
GatewayDestinationEndpointServed) with ai-lb as the picker: the conformance suite itself
needs a Kubernetes cluster and a Gateway controller (see docs/gie.md)."""

from __future__ import annotations

import json
import zlib

import pytest
import yaml

import certs
import harness as h

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
PROMPT = 200 * 1024


def _route(name: str, prefix: str, subset: list[str] | None = None, retry: bool = False) -> dict:
    r: dict = {"name": name, "match": {"prefix": prefix},
               "route": {"cluster": "llm_backends", "prefix_rewrite": "/", "timeout": "60s"}}
    if retry:
        r["route"]["retry_policy"] = {"retry_on": "connect-failure,refused-stream", "num_retries": 2}
    if subset is not None:
        r["typed_per_filter_config"] = {"envoy.filters.http.set_metadata": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
            "metadata": [{"metadata_namespace": "envoy.lb.subset_hint",
                          "value": {"x-gateway-destination-endpoint-subset": subset}}]}}
    return r


def gie_envoy(tmp, ports, backends, dead, pki) -> h.Proc:
    """The reference config, turned into a GIE-style gateway."""
    path = h.render_envoy(tmp / "envoy-ref.yaml", ports, backends)
    cfg = yaml.safe_load(path.read_text())
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters = hcm["http_filters"]
    ext = next(f for f in filters if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]
    ext["message_timeout"] = "5s"
    ext["processing_mode"].update(request_body_mode="FULL_DUPLEX_STREAMED", request_trailer_mode="SEND",
                                  response_header_mode="SEND")
    filters.insert(0, {"name": "envoy.filters.http.set_metadata", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config"}})
    addr = [f"127.0.0.1:{p}" for p in backends]
    vh = hcm["route_config"]["virtual_hosts"][0]
    vh["routes"][:0] = [_route("subset", "/subset/", subset=addr[1:]),
                        _route("subset-none", "/subset-none/", subset=["127.0.0.1:1"]),
                        _route("retry", "/retry/", retry=True),
                        _route("conformance", "/conformance/")]
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    clusters["llm_backends"]["load_assignment"]["endpoints"][0]["lb_endpoints"].append(
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": dead}}}})
    clusters["ai_lb"]["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": certs.SERVER_NAME,
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificates": [{"certificate_chain": {"filename": str(pki["envoy_cert"])},
                                  "private_key": {"filename": str(pki["envoy_key"])}}],
            "validation_context": {"trusted_ca": {"filename": str(pki["ca"])},
                                   "match_typed_subject_alt_names": [
                                       {"san_type": "DNS", "matcher": {"exact": certs.SERVER_NAME}}]}}}}
    out = tmp / "envoy.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    p = h.spawn("envoy", [h.envoy_binary(), "-c", str(out), "--log-level", "warn", "--use-dynamic-base-id",
                          "--concurrency", "2"], tmp)
    h.wait_port(ports.listen, proc=p, timeout=20)
    return p


@pytest.fixture(scope="module")
def gie(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gie")
    backends = h.free_ports(3)
    listen, admin, ai_lb, metrics, dead = h.free_ports(5)
    ca = certs.CA.make()
    (tmp / "ca.pem").write_bytes(ca.pem)
    server_cert, server_key = certs.write_server(ca, tmp)
    envoy_cert, envoy_key = certs.write_client(ca, tmp, "envoy")
    pki = {"ca": tmp / "ca.pem", "envoy_cert": envoy_cert, "envoy_key": envoy_key,
           "tls": {"cert": str(server_cert), "key": str(server_key), "client_ca": str(tmp / "ca.pem")}}
    sim = h.start_sim(tmp, backends, "--model", "sim-model", "--max-model-len", "1000000", "--time-scale", "0.02",
                      "--admin-port", "-1", "--seed", "1")
    ports = h.EnvoyPorts(listen, admin, ai_lb)
    envoy = gie_envoy(tmp, ports, backends, dead, pki)
    h.wait_cluster_healthy(admin, "llm_backends", 3)
    st = Gie(tmp, backends, ports, metrics, dead, pki, envoy, sim)
    yield st
    st.stop_ai_lb()
    envoy.stop()
    sim.stop()


class Gie:
    def __init__(self, tmp, backends, ports, metrics_port, dead, pki, envoy, sim):
        self.tmp, self.backends, self.ports, self.metrics_port = tmp, backends, ports, metrics_port
        self.dead, self.pki, self.envoy, self.sim = dead, pki, envoy, sim
        self.proc: h.Proc | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports.listen}"

    def addr(self, i: int) -> str:
        return f"127.0.0.1:{self.backends[i]}"

    def ai_lb(self, routes: dict, **server) -> None:
        self.stop_ai_lb()
        path = self.tmp / "ai-lb.yaml"
        h.write_ai_lb_config(path, self.ports.ai_lb, self.metrics_port, routes, envoy_admin_port=self.ports.admin,
                             plugins=["plugins.model_pin", "plugins.header_pick"],
                             server={"tls": self.pki["tls"], **server})
        self.proc = h.start_ai_lb(self.tmp, path, self.ports.ai_lb)
        h.wait_cluster_healthy(self.ports.admin, "ai_lb", 1)  # Envoy's gRPC health check, over mTLS

    def stop_ai_lb(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def metrics(self) -> str:
        return h.metrics_text(self.metrics_port)


def big(i: int, model: str = "sim-model") -> dict:
    return h.chat_body(f"{i} " + "lorem ipsum dolor sit amet " * (PROMPT // 27), model=model)


def usage_tokens(url: str, body: dict, headers: dict | None = None) -> tuple[int, int, str]:
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json",
                                                                               **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())["usage"]["prompt_tokens"], r.headers.get("x-sim-server", "")
    except urllib.error.HTTPError as e:
        return e.code, -1, ""


def pinned(gie: Gie, model: str) -> str:
    eps = sorted(gie.addr(i) for i in range(3))
    return eps[zlib.crc32(model.encode()) % 3].rsplit(":", 1)[1]


def test_full_duplex_200kb_prompts_reach_the_backend_whole_and_are_routed_by_their_body(gie):
    for salt in ("", "a", "b"):  # the pin moves with the salt: each run shows the pick came from the body
        gie.ai_lb({"llm": {"lb_policy": "test_model_pin", "lb_config": {"salt": salt},
                           "endpoints": {"cluster": "llm_backends"}}})
        body = big(len(salt))
        direct = usage_tokens(f"http://{gie.addr(0)}{CHAT}", body)
        via = usage_tokens(gie.url + CHAT, body)
        assert direct[0] == 200 and direct[1] > 20_000
        assert via[:2] == (200, direct[1])  # the same prompt, token for token
        assert via[2] == pinned(gie, salt + "sim-model")
        res = h.load(gie.url + CHAT, n=12, concurrency=6, make_body=big)
        assert res.failed == 0, (res.statuses, res.errors[:2])
        assert dict(res.served_by) == {pinned(gie, salt + "sim-model"): 12}
        m = gie.metrics()
        assert h.metric_value(m, "ai_lb_fallbacks_total") == 0
        assert h.metric_value(m, "ai_lb_decisions_total", route="llm", outcome="picked") == 13


def test_full_duplex_header_policy_and_oversized_prompt_still_deliver_every_byte(gie):
    gie.ai_lb({"llm": {"lb_policy": "round_robin", "endpoints": {"cluster": "llm_backends"}},
               "body-small": {"lb_policy": "test_model_pin", "endpoints": {"cluster": "llm_backends"}}},
              max_body_bytes=64 * 1024)
    body = big(7)
    direct = usage_tokens(f"http://{gie.addr(0)}{CHAT}", body)[1]
    res = h.load(gie.url + CHAT, n=12, concurrency=4, make_body=lambda i: body)
    assert res.failed == 0 and len(res.served_by) == 3  # round robin, decided on headers, body echoed
    assert usage_tokens(gie.url + CHAT, body)[:2] == (200, direct)
    # A body policy over max_body_bytes: native LB, and the prompt still arrives whole.
    gie.ai_lb({"llm": {"lb_policy": "test_model_pin", "endpoints": {"cluster": "llm_backends"}}},
              max_body_bytes=64 * 1024)
    assert usage_tokens(gie.url + CHAT, body)[:2] == (200, direct)
    assert h.metric_value(gie.metrics(), "ai_lb_fallbacks_total", route="llm", reason="body_too_large") == 1


def test_subset_hint_restricts_the_pick_and_an_empty_intersection_is_503(gie):
    gie.ai_lb({"subset": {"lb_policy": "least_request", "endpoints": {"cluster": "llm_backends"}},
               "subset-none": {"lb_policy": "least_request", "endpoints": {"cluster": "llm_backends"}}})
    res = h.load(gie.url + "/subset" + CHAT, n=30, concurrency=5, make_body=big)
    assert res.failed == 0, (res.statuses, res.errors[:2])
    assert set(res.served_by) == {str(gie.backends[1]), str(gie.backends[2])}  # never backend 0
    res = h.load(gie.url + "/subset-none" + CHAT, n=5, concurrency=1, make_body=big)
    assert res.statuses == {503: 5}
    # A client cannot send its own subset (or destination): the gateway strips the headers.
    spoof = {"x-gateway-destination-endpoint-subset": gie.addr(0), "x-gateway-destination-endpoint": gie.addr(0)}
    res = h.load(gie.url + "/subset" + CHAT, n=10, concurrency=2, make_body=big, headers=spoof)
    assert res.failed == 0 and str(gie.backends[0]) not in res.served_by


def test_fallback_list_walks_retries_and_the_served_endpoint_comes_back(gie):
    dead = f"127.0.0.1:{gie.dead}"
    gie.ai_lb({"retry": {"lb_policy": "test_first", "endpoints": {"static": [dead, gie.addr(1), gie.addr(2)]}},
               "llm": {"lb_policy": "round_robin", "endpoints": {"cluster": "llm_backends"}}})
    res = h.load(gie.url + "/retry" + CHAT, n=12, concurrency=3, make_body=big)
    assert res.failed == 0, (res.statuses, res.errors[:2])  # the pick refuses connections; Envoy retried
    assert set(res.served_by) <= {str(gie.backends[1]), str(gie.backends[2])}
    m = gie.metrics()
    assert h.metric_value(m, "ai_lb_served_endpoint_total", route="retry", outcome="fallback") == 12
    # moved to where they ran, then released
    assert h.eventually(lambda: h.metric_value(gie.metrics(), "ai_lb_inflight_requests"), 0) == 0
    res = h.load(gie.url + CHAT, n=9, concurrency=3, make_body=big)
    assert res.failed == 0
    assert h.metric_value(gie.metrics(), "ai_lb_served_endpoint_total", route="llm", outcome="picked") == 9


@pytest.mark.parametrize("which", [[2], [0, 1], [0, 1, 2]], ids=["one", "two", "all"])
def test_conformance_gateway_following_epp_routing(gie, which):
    """GIE GatewayFollowingEPPRouting: 100 requests, 10 at a time, only to the listed pods."""
    gie.ai_lb({"conformance": {"lb_policy": "test_header_pick", "fallback_endpoints": 0,
                               "endpoints": {"cluster": "llm_backends"}}})
    want = ",".join(gie.addr(i) for i in which)
    res = h.load(gie.url + "/conformance" + CHAT, n=100, concurrency=10, headers={"test-epp-endpoint-selection": want},
                 make_body=lambda i: h.chat_body("Answer with no disclaimers: genetically modified food?"))
    assert res.failed == 0
    assert set(res.served_by) <= {str(gie.backends[i]) for i in which}


def test_conformance_gateway_destination_endpoint_served(gie):
    """GIE GatewayDestinationEndpointServed: the gateway reports the endpoint that served."""
    gie.ai_lb({"conformance": {"lb_policy": "test_header_pick", "fallback_endpoints": 0,
                               "endpoints": {"cluster": "llm_backends"}}})
    for i in range(3):
        res = h.load(gie.url + "/conformance" + CHAT, n=5, concurrency=1, headers={"test-epp-endpoint-selection": gie.addr(i)})
        assert res.failed == 0 and set(res.served_by) == {str(gie.backends[i])}
    assert h.metric_value(gie.metrics(), "ai_lb_served_endpoint_total", route="conformance", outcome="picked") == 15
