"""A shared stack per test module: 3 simulated vLLM servers behind the reference Envoy.

ai-lb itself is started per test (``stack.ai_lb(routes)``) because tests kill it, reload
it and change its config.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import harness as h


@dataclass
class Stack:
    tmp: Path
    backends: list[int]
    ports: h.EnvoyPorts
    metrics_port: int
    envoy: h.Proc
    sim: h.Proc
    procs: list[h.Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports.listen}"

    def addr(self, i: int) -> str:
        return f"127.0.0.1:{self.backends[i]}"

    def config_path(self) -> Path:
        return self.tmp / "ai-lb.yaml"

    def write_config(self, routes: dict, **top) -> Path:
        return h.write_ai_lb_config(self.config_path(), self.ports.ai_lb, self.metrics_port, routes,
                                    envoy_admin_port=self.ports.admin, **top)

    def ai_lb(self, routes: dict, wait_discovery: bool = True, **top) -> h.Proc:
        self.write_config(routes, **top)
        p = h.start_ai_lb(self.tmp, self.config_path(), self.ports.ai_lb)
        self.procs.append(p)
        self.wait_envoy_sees_ai_lb(True)
        if wait_discovery:
            time.sleep(0.5)  # first endpoint discovery from Envoy's admin API
        return p

    def wait_envoy_sees_ai_lb(self, healthy: bool, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hh = h.envoy_host_health(self.ports.admin, "ai_lb")
            if hh and all(hh.values()) == healthy:
                return
            time.sleep(0.05)
        raise TimeoutError(f"ai_lb cluster health never became {healthy}")

    def metrics(self) -> str:
        return h.metrics_text(self.metrics_port)

    def stop_ai_lbs(self) -> None:
        for p in self.procs:
            p.stop()
        self.procs.clear()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stack")
    backends = h.free_ports(3)
    listen, admin, ai_lb, metrics = h.free_ports(4)
    sim = h.start_sim(tmp, backends, "--model", "sim-model", "--max-model-len", "1000000", "--time-scale", "0.02", "--admin-port", "-1", "--seed", "1")
    ports = h.EnvoyPorts(listen, admin, ai_lb)
    envoy = h.start_envoy(tmp, ports, backends)
    h.wait_cluster_healthy(admin, "llm_backends", 3)
    s = Stack(tmp, backends, ports, metrics, envoy, sim)
    yield s
    s.stop_ai_lbs()
    envoy.stop()
    sim.stop()


@pytest.fixture
def gw(stack):
    """The stack, with any ai-lb a test started stopped afterwards."""
    yield stack
    stack.stop_ai_lbs()
