"""``ai-lb bench --backend-urls`` against servers that look like plain vLLM (the simulator
with ``--no-sim-api``: no /sim/* routes, no x-sim-* headers): the oracle refuses to run,
every system starts on reset caches (the simulator's own prefix-cache counters say so),
the model comes from /v1/models, prompts are capped, the backends' CPU is measured."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from aibench import devstack as ds
from harness import ROOT

pytestmark = pytest.mark.e2e
REQUESTS = 6


def test_real_backend_mode_is_honest(tmp_path):
    (port,) = ds.free_ports(1)
    sim = ds.start_sim(tmp_path, [port], "--model", "plain-model", "--no-sim-api", "--time-scale", "0.05",
                       "--admin-port", "-1", "--stream-chunk-tokens", "8")
    try:
        # The same long prompt again and again, one after another: the first request of a system
        # misses, every later one hits; a system that started on the previous one's warm cache
        # would hit on its first request too.
        log = tmp_path / "same.jsonl"
        body = {"messages": [{"role": "user", "content": "cold cache check " * 120}], "max_tokens": 4}
        log.write_text("".join(json.dumps({"t": 0.3 * k, "session": "s", "body": body}) + "\n"
                               for k in range(REQUESTS)))
        out = tmp_path / "res"
        r = subprocess.run([sys.executable, "-m", "extproc", "bench", "--workload", f"requests:{log}",
                            "--backend-urls", f"127.0.0.1:{port}", "--replay-speed", "1", "--grace", "10",
                            "--max-prompt-tokens", "200", "--systems", "oracle,envoy-rr,ai-lb:round_robin",
                            "--out", str(out)], capture_output=True, text=True, timeout=150, cwd=ROOT)
    finally:
        sim.stop()
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["meta"]["model"] == "plain-model"
    by = {x["system"]: x for x in doc["results"]}
    assert by["oracle"]["status"] == "failed" and "refuses" in by["oracle"]["error"]
    assert "/sim/" in by["oracle"]["error"]
    prompt = 199  # capped: 188 tokens of text + 11 of chat template
    cold = (REQUESTS - 1) * ((prompt - 1) // 16 * 16) / (REQUESTS * prompt)
    for name in ("envoy-rr", "ai-lb:round_robin"):
        x = by[name]
        assert x["status"] == "ok", x.get("error")
        assert x["cache"] == {"state": "reset", "methods": ["vllm"], "reset": 1, "backends": 1, "failed": {}}
        assert x["summary"]["ok"] == REQUESTS and {q["prompt_tokens"] for q in x["requests"]} == {prompt}
        assert x["prefix_cache"]["queries"] == REQUESTS * prompt
        assert x["prefix_hit_rate"] == pytest.approx(cold, abs=1e-9), name  # started cold
        be = x["cpu"]["components"]["backends"]   # the local backend's process tree was found and read
        assert be["processes"] >= 1 and be["cpu_s"] >= 0   # (6 tiny requests can round to 0 clock ticks)
        assert set(x["served"]) == {f"127.0.0.1:{port}"} and x["served_by_source"].startswith("response header")
        assert x["backend_requests"] == {f"127.0.0.1:{port}": REQUESTS}
    md = (out / "results.md").read_text()
    assert "carried over" not in md and "reset (vllm)" in md and "**failed**: RuntimeError: the oracle" in md
