"""Prefill/decode disaggregation through the real Envoy: ai-lb's PD route picks a prefill
and a decode server, the PD sidecar in front of the decode server runs vLLM's NixlConnector
flow against simulated servers, and the simulators' own state shows the decode server did
not compute the prompt. Then registration (FastDeploy's API): registered instances take
traffic through Envoy's EDS cluster, a killed one leaves rotation, bad registrations
change nothing."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

import harness as h

pytestmark = pytest.mark.e2e

TOKEN = "s3cret-registration-token"
KV_BOTH = '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'


def call(url: str, doc=None, token: str | None = TOKEN, method: str | None = None, raw: bytes | None = None):
    """(status, JSON body, headers) of one request (errors included)."""
    data = raw if raw is not None else (json.dumps(doc).encode() if doc is not None else None)
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                 headers={"content-type": "application/json",
                                          **({"authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            body = r.read().decode()
            return r.status, (json.loads(body) if body and not body.startswith("data:") else body), dict(r.headers)
    except urllib.error.HTTPError as e:
        body = e.read().decode()
        return e.code, (json.loads(body) if body.startswith("{") else body), dict(e.headers)


class PD:
    def __init__(self, tmp):
        self.tmp = tmp
        # one simulator process: a prefill server, a decode server, two mixed servers
        self.ports = h.free_ports(4)
        self.p, self.d, self.m1, self.m2 = self.ports
        self.sim = h.start_sim(tmp, self.ports, "--model", "sim-model", "--time-scale", "0.02", "--admin-port", "-1",
                               "--roles", "prefill,decode,mixed,mixed", "--seed", "2", name="sim-pd")
        self.sidecar_port, listen, admin, grpc, metrics, self.api_port = h.free_ports(6)
        self.sidecar = h.spawn("sidecar", [h.PY, "-m", "extproc", "pd-sidecar", "--listen",
                                           f"127.0.0.1:{self.sidecar_port}", "--decode", f"127.0.0.1:{self.d}"], tmp)
        h.wait_port(self.sidecar_port, proc=self.sidecar)
        self.envoy_ports = h.EnvoyPorts(listen, admin, grpc)
        self.envoy = h.start_envoy(tmp, self.envoy_ports, [self.sidecar_port])
        (tmp / "token").write_text(TOKEN + "\n")
        pd = {"lb_policy": "pd", "lb_config": {"prefill": {"lb_policy": "cache_aware"}}}
        routes = {"llm": {**pd, "endpoints": {"cluster": "llm_backends", "roles": {"prefill": [self.addr(self.p)],
                                                                                 "decode": [self.addr(self.sidecar_port)]}}},
                  "llm-registered": {**pd, "endpoints": {"registered": True}}}
        reg = {"listen": f"127.0.0.1:{self.api_port}", "token_file": str(tmp / "token"),
               "health-check-interval-secs": 0.2, "health-check-timeout-secs": 0.5,
               "health-failure-threshold": 2, "health-success-threshold": 1}
        cfg = h.write_ai_lb_config(tmp / "ai-lb.yaml", grpc, metrics, routes, envoy_admin_port=admin, registration=reg)
        self.ai_lb = h.start_ai_lb(tmp, cfg, grpc)
        h.wait_port(self.api_port, proc=self.ai_lb)
        self.metrics_port = metrics
        h.wait_cluster_healthy(admin, "llm_backends", 1)

    @staticmethod
    def addr(port: int) -> str:
        return f"127.0.0.1:{port}"

    def api(self, path: str) -> str:
        return f"http://127.0.0.1:{self.api_port}{path}"

    def url(self, route: str = "") -> str:
        return f"http://127.0.0.1:{self.envoy_ports.listen}{route}/v1/chat/completions"

    def state(self, port: int) -> dict:
        return h.sim_state(port)

    def stop(self):
        for p in (self.ai_lb, self.envoy, self.sidecar, self.sim):
            p.stop()


@pytest.fixture(scope="module")
def pd(tmp_path_factory):
    s = PD(tmp_path_factory.mktemp("pd"))
    yield s
    s.stop()


def _prompt(tag: str) -> str:
    return f"[{tag}] " + "a long document about disaggregated prefill and decode " * 40


def _pd_round_trip(pd: PD, url: str, stream: bool, tag: str, headers: dict | None = None) -> None:
    d0, p0 = pd.state(pd.d), pd.state(pd.p)
    body = h.chat_body(_prompt(tag), max_tokens=12, stream=stream)
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=20) as r:
        raw = r.read().decode()
        assert r.status == 200
        assert r.headers["x-pd-prefill"] == pd.addr(pd.p)   # the sidecar used ai-lb's prefill server
        assert r.headers["x-sim-server"] == str(pd.d)       # and the decode server answered
    if stream:
        assert raw.rstrip().endswith("data: [DONE]") and raw.count('"content":') >= 12
    else:
        assert json.loads(raw)["usage"]["completion_tokens"] == 12
    d1, p1 = pd.state(pd.d), pd.state(pd.p)
    src0, src1 = d0["prompt_tokens_by_source"], d1["prompt_tokens_by_source"]
    # The decode server computed one prompt token (vLLM recomputes the last one for the
    # logits); the rest came from the prefill server, which computed it.
    assert src1["local_compute"] - src0["local_compute"] == 1
    assert src1["external_kv_transfer"] - src0["external_kv_transfer"] > 400
    assert d1["kv_transfers"]["recomputed"] == d0["kv_transfers"]["recomputed"]
    assert p1["kv_transfers"]["pulled"] == p0["kv_transfers"]["pulled"] + 1
    assert p1["prompt_tokens_by_source"]["local_compute"] > p0["prompt_tokens_by_source"]["local_compute"] + 400
    # Both endpoints were counted in flight, and both released once the response ended.
    inflight = lambda: {a: h.metric_value(h.metrics_text(pd.metrics_port), "ai_lb_inflight_requests", endpoint=a)
                        for a in (pd.addr(pd.p), pd.addr(pd.sidecar_port))}  # noqa: E731
    assert h.eventually(inflight, {pd.addr(pd.p): 0.0, pd.addr(pd.sidecar_port): 0.0}) == \
        {pd.addr(pd.p): 0.0, pd.addr(pd.sidecar_port): 0.0}
    text = h.metrics_text(pd.metrics_port)  # (a gauge sample exists once an endpoint was counted)
    assert all(f'ai_lb_inflight_requests{{endpoint="{a}"}}' in text for a in (pd.addr(pd.p), pd.addr(pd.sidecar_port)))


@pytest.mark.parametrize("stream", [False, True])
def test_pd_through_envoy_and_sidecar_decode_does_not_recompute(pd, stream):
    _pd_round_trip(pd, pd.url(), stream, f"static-{stream}")


def test_client_cannot_name_the_prefill_server(pd):
    # A client-sent prefiller header (and destination) is stripped before ai-lb runs: the
    # request still prefills on the server ai-lb chose, never on the client's.
    _pd_round_trip(pd, pd.url(), False, "spoof", headers={"x-prefiller-host-port": pd.addr(pd.m1),
                                                           "x-gateway-destination-endpoint": pd.addr(pd.m1)})
    assert pd.state(pd.m1)["prompt_tokens_by_source"]["local_compute"] == 0


def test_bad_registrations_get_a_clear_4xx_and_change_nothing(pd):
    before = call(pd.api("/registered"))[1]
    ok = {"role": "decode", "host_ip": "127.0.0.1", "port": pd.sidecar_port}
    cases = [
        ({"host_ip": "127.0.0.1", "port": 1}, TOKEN, 400, "role is required"),
        ({"role": "prefill"}, TOKEN, 400, "host_ip is required; port is required"),
        ({**ok, "role": "sideways"}, TOKEN, 400, "invalid role"),
        ({**ok, "host_ip": "vllm.example.com"}, TOKEN, 400, "invalid host_ip"),
        ({**ok, "port": 70000}, TOKEN, 400, "invalid port"),
        (ok, "wrong-token", 401, "bearer token"),
        (ok, None, 401, "bearer token"),
    ]
    for doc, token, status, words in cases:
        code, answer, headers = call(pd.api("/register"), doc, token=token)
        assert code == status and words in answer["msg"], (doc, code, answer)
    assert call(pd.api("/register"), raw=b"{not json")[0] == 400
    assert call(pd.api("/registered"), token=None)[0] == 401  # reads need the token too
    # a healthy-looking registration of a dead port: FastDeploy's 503
    code, answer, _ = call(pd.api("/register"), {"role": "mixed", "host_ip": "127.0.0.1", "port": h.free_ports(1)[0]})
    assert (code, answer["msg"]) == (503, "service is not healthy")
    assert call(pd.api("/registered"))[1] == before


def _wait(probe, timeout=8.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(0.1)
    return probe()


def test_registered_instances_take_traffic_through_envoy_and_a_killed_one_leaves(pd):
    for role, port in (("prefill", pd.p), ("decode", pd.sidecar_port), ("mixed", pd.m1), ("mixed", pd.m2)):
        code, answer, _ = call(pd.api("/register"), {"role": role, "host_ip": "127.0.0.1", "port": port,
                                                     "metrics_port": port, "transfer_protocol": ["rdma"]})
        assert (code, answer) == (200, {"code": 200, "msg": "Register success"})
    assert call(pd.api("/registered_number"))[1] == {"prefill": 1, "decode": 1, "mixed": 2}
    listed = call(pd.api("/registered"))[1]
    assert [w["url"] for w in listed["prefill"]] == [f"http://{pd.addr(pd.p)}"] and listed["prefill"][0]["healthy"]
    # Envoy learnt the hosts over EDS (no config change): decode and mixed, not prefill.
    hosts = _wait(lambda: set(h.envoy_host_health(pd.envoy_ports.admin, "llm_registered")) ==
                  {pd.addr(pd.sidecar_port), pd.addr(pd.m1), pd.addr(pd.m2)} or None)
    assert hosts
    served = set()
    for i in range(30):   # request_num breaks ties at random: 12 tries missed one of three 2.3% of the time
        st, _, headers = call(pd.url("/registered"), h.chat_body(_prompt(f"reg{i}"), max_tokens=4), token=None)
        assert st == 200
        served.add(headers["x-sim-server"])
    assert served == {str(pd.d), str(pd.m1), str(pd.m2)}  # all three decode-capable instances took traffic
    _pd_round_trip_registered(pd)
    # Kill a mixed server: after the failure threshold it leaves rotation (ai-lb and Envoy).
    h.post_json(f"http://127.0.0.1:{pd.m2}/sim/crash", {})
    gone = _wait(lambda: [w for w in call(pd.api("/registered"))[1]["mixed"]
                          if w["url"].endswith(f":{pd.m2}") and not w["healthy"]])
    assert gone
    assert call(pd.api("/health_generate"))[1]["unhealthy"] == [f"http://{pd.addr(pd.m2)}"]
    _wait(lambda: h.envoy_host_health(pd.envoy_ports.admin, "llm_registered").get(pd.addr(pd.m2)) is False or
          pd.addr(pd.m2) not in h.envoy_host_health(pd.envoy_ports.admin, "llm_registered"), timeout=3)
    after = [call(pd.url("/registered"), h.chat_body(f"after {i}", max_tokens=2), token=None) for i in range(10)]
    assert all(st == 200 for st, _, _ in after)
    assert str(pd.m2) not in {hd["x-sim-server"] for _, _, hd in after}
    text = h.metrics_text(pd.metrics_port)
    assert h.metric_value(text, "ai_lb_registry_events_total", event="unhealthy") >= 1
    assert h.metric_value(text, "ai_lb_registered_instances", role="mixed", state="unhealthy") == 1


def _pd_round_trip_registered(pd: PD) -> None:
    """Roles from registration: the decode pool's pick goes through the sidecar and the
    registered prefill server computes the prompt (when the decode pool picks it)."""
    for i in range(20):
        d0 = pd.state(pd.d)["prompt_tokens_by_source"]
        st, _, headers = call(pd.url("/registered"), h.chat_body(_prompt(f"regpd{i}"), max_tokens=3), token=None)
        assert st == 200
        if headers["x-sim-server"] == str(pd.d):
            assert headers["x-pd-prefill"] == pd.addr(pd.p)
            assert pd.state(pd.d)["prompt_tokens_by_source"]["local_compute"] - d0["local_compute"] == 1
            return
    pytest.fail("the decode instance never took a request")
