"""cluster_metrics through the real Envoy: route llm-multi (cluster_header) over three clusters,
one simulated vLLM server each (the server's port comes back in x-sim-server)."""

from __future__ import annotations

import json
import time
import urllib.request
from collections import Counter

import pytest

import harness as h

CLUSTERS = ("llm_backends", "llm_backends_b", "llm_backends_c")
HEADER = "x-higress-target-cluster"


class MultiStack:
    def __init__(self, tmp):
        self.tmp = tmp
        self.backends = h.free_ports(3)
        listen, admin, ai_lb, metrics = h.free_ports(4)
        self.ports = h.EnvoyPorts(listen, admin, ai_lb)
        self.metrics_port = metrics
        self.by_cluster = dict(zip(CLUSTERS, self.backends))
        self.ai = None
        self.sim = h.start_sim(tmp, self.backends, "--model", "sim-model", "--max-model-len", "100000",
                               "--time-scale", "0.02", "--admin-port", "-1", "--seed", "1")
        try:
            self.envoy = h.start_envoy(tmp, self.ports, [self.backends[0]], extra_backends_clusters={
                "llm_backends_b": [self.backends[1]], "llm_backends_c": [self.backends[2]]})
            for c in CLUSTERS:
                h.wait_cluster_healthy(admin, c, 1)
        except Exception:
            self.sim.stop()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports.listen}/multi/v1/chat/completions"

    def start_ai_lb(self, mode: str, **cfg) -> None:
        path = self.tmp / "ai-lb.yaml"
        routes = {"llm-multi": {"lb_type": "cluster", "lb_policy": "cluster_metrics",
                                "lb_config": {"mode": mode, "service_list": list(CLUSTERS), **cfg}}}
        h.write_ai_lb_config(path, self.ports.ai_lb, self.metrics_port, routes, envoy_admin_port=self.ports.admin)
        self.ai = h.start_ai_lb(self.tmp, path, self.ports.ai_lb)
        self.wait_ai_lb_health(True)

    def stop_ai_lb(self) -> None:
        if self.ai is not None:
            self.ai.stop()
            self.ai = None
            self.wait_ai_lb_health(False)

    def wait_ai_lb_health(self, healthy: bool, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hh = h.envoy_host_health(self.ports.admin, "ai_lb")
            if hh and all(hh.values()) == healthy:
                return
            time.sleep(0.05)
        raise TimeoutError(f"ai_lb health never became {healthy}")

    def decisions(self) -> dict[str, float]:
        text = h.metrics_text(self.metrics_port)
        return {c: h.metric_value(text, "ai_lb_decisions_total", route="llm-multi", endpoint=c) for c in CLUSTERS}

    def served_clusters(self, res: h.LoadResult) -> Counter:
        port_to_cluster = {str(p): c for c, p in self.by_cluster.items()}
        return Counter({port_to_cluster.get(k, k): v for k, v in res.served_by.items()})

    def set_faults(self, cluster: str, **faults) -> None:
        port = self.by_cluster[cluster]
        req = urllib.request.Request(f"http://127.0.0.1:{port}/sim/faults", data=json.dumps(faults).encode(),
                                     headers={"content-type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200

    def close(self) -> None:
        if self.ai is not None:
            self.ai.stop()
        self.envoy.stop()
        self.sim.stop()


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    s = MultiStack(tmp_path_factory.mktemp("multi"))
    yield s
    s.close()


@pytest.fixture
def ms(multi):
    yield multi
    multi.stop_ai_lb()
    for c in CLUSTERS:
        multi.set_faults(c, reset=True)


def test_requests_land_on_the_cluster_ai_lb_chose(ms):
    ms.start_ai_lb("LeastBusy")
    res = h.load(ms.url, n=30, concurrency=3, make_body=lambda i: h.chat_body(f"hi {i}", max_tokens=3))
    assert res.failed == 0, (res.statuses, res.errors[:3])
    served = ms.served_clusters(res)
    decided = ms.decisions()
    assert sum(decided.values()) == 30
    # Every cluster was used, and each served exactly as many requests as ai-lb sent it.
    assert set(served) == set(CLUSTERS), served
    assert {c: int(decided[c]) for c in CLUSTERS} == {c: served[c] for c in CLUSTERS}


def test_client_cannot_choose_the_cluster(ms):
    # ai-lb up: a spoofed header is overwritten with ai-lb's choice.
    ms.start_ai_lb("LeastBusy")
    res = h.load(ms.url, n=12, concurrency=2, headers={HEADER: "llm_backends_c"})
    assert res.failed == 0, (res.statuses, res.errors[:3])
    served = ms.served_clusters(res)
    decided = ms.decisions()
    assert {c: int(decided[c]) for c in CLUSTERS} == {c: served[c] for c in CLUSTERS}
    assert served["llm_backends_c"] < 12 and len(served) >= 2, served
    # ai-lb down (fail-open): the spoofed header is stripped before routing and the default
    # cluster serves; an unknown cluster name from the client cannot cause a 503 either.
    ms.stop_ai_lb()
    for spoof in ("llm_backends_c", "no_such_cluster"):
        res = h.load(ms.url, n=4, concurrency=1, headers={HEADER: spoof})
        assert res.statuses == {200: 4}, (spoof, res.statuses, res.errors[:3])
        assert ms.served_clusters(res) == {"llm_backends": 4}


def test_fail_open_without_ai_lb_uses_default_cluster(ms):
    res = h.load(ms.url, n=3, concurrency=1)
    assert res.statuses == {200: 3}
    assert ms.served_clusters(res) == {"llm_backends": 3}


def test_slow_cluster_loses_least_total_latency_traffic(ms):
    # sample_ttl short so a cluster's old history ages out within the test.
    ms.start_ai_lb("LeastTotalLatency", explore_picks=2, sample_ttl=2)
    body = lambda i: h.chat_body(f"q {i}", max_tokens=16)  # noqa: E731
    # Phase 1: b is the only fast cluster, so it takes the traffic (after probes of a and c).
    ms.set_faults("llm_backends", slowdown=5)
    ms.set_faults("llm_backends_c", slowdown=5)
    p1 = h.load(ms.url, n=20, concurrency=2, make_body=body)
    assert p1.failed == 0, (p1.statuses, p1.errors[:3])
    s1 = ms.served_clusters(p1)
    assert s1["llm_backends_b"] >= 14, s1
    # Phase 2: b turns slow, the others recover. Once b's slow answers come back (and the
    # others' old samples age out and they are probed again), traffic moves off b.
    ms.set_faults("llm_backends_b", slowdown=5)
    ms.set_faults("llm_backends", reset=True)
    ms.set_faults("llm_backends_c", reset=True)
    h.load(ms.url, duration=3.0, concurrency=2, make_body=body)
    before = ms.decisions()
    p3 = h.load(ms.url, n=30, concurrency=2, make_body=body)
    assert p3.failed == 0, (p3.statuses, p3.errors[:3])
    after = ms.decisions()
    served = ms.served_clusters(p3)
    assert {c: int(after[c] - before[c]) for c in CLUSTERS} == {c: served[c] for c in CLUSTERS}
    # b may get its exploration probes (explore_picks=2) when its samples age out, nothing more
    # (LeastBusy would send it about a third).
    assert served["llm_backends_b"] <= 2, (served, sorted(p3.latencies)[len(p3.latencies) // 2])
