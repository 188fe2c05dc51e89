"""A Higress ai-load-balancer block works without an added `endpoints:`: the route's own
Envoy cluster (the xds.cluster_name attribute Envoy sends) is discovered from the admin
API, through the real Envoy; and examples/higress.yaml runs unchanged in the demo."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import harness as h

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"


def test_route_without_endpoints_balances_over_its_own_envoy_cluster(gw):
    gw.ai_lb({"llm": {"lb_type": "endpoint", "lb_policy": "round_robin"},
              "llm-multi": {"lb_type": "endpoint", "lb_policy": "round_robin"}})
    res = h.load(gw.url + CHAT, n=30, concurrency=1)
    assert res.failed == 0, res.errors[:3]
    assert sorted(res.served_by.values()) == [10, 10, 10]  # ai-lb's rotation over llm_backends' 3 hosts
    m = gw.metrics()
    assert h.metric_value(m, "ai_lb_decisions_total", route="llm", outcome="picked") == 30
    assert h.metric_value(m, "ai_lb_route_endpoints", route="llm", state="healthy") == 3
    # Route llm-multi goes to cluster llm_backends (its default x-higress-target-cluster): the same hosts.
    res = h.load(gw.url + "/multi" + CHAT, n=6, concurrency=1)
    assert res.failed == 0 and len(res.served_by) == 3
    assert h.metric_value(gw.metrics(), "ai_lb_decisions_total", route="llm-multi", outcome="picked") == 6


def test_check_config_needs_the_admin_api_for_a_bare_higress_block(tmp_path):
    bare = tmp_path / "bare.yaml"
    bare.write_text("routes: {llm: {lb_type: endpoint, lb_policy: metrics_based, lb_config: {metric_policy: default}}}\n")
    r = subprocess.run([sys.executable, "-m", "extproc", "check-config", str(bare)], capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "routes.llm.endpoints: required for lb_type 'endpoint' unless server.envoy_admin" in r.stderr
    r = subprocess.run([sys.executable, "-m", "extproc", "check-config", str(ROOT / "examples" / "higress.yaml")],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_demo_runs_the_higress_example_unchanged():
    example = ROOT / "examples" / "higress.yaml"
    before = hashlib.sha256(example.read_bytes()).hexdigest()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "-m", "extproc", "demo", "--requests", "12", "--config", str(example)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "higress.yaml: llm=metrics_based" in out, out
    assert "ai_lb_decisions_total{policy=metrics_based, outcome=picked}" in out, out
    assert "rotates over all backends: yes" in out and "fail-open: 6/6 requests succeeded" in out, out
    assert hashlib.sha256(example.read_bytes()).hexdigest() == before  # used as it is, never rewritten
