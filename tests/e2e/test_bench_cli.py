"""`ai-lb bench` on a tiny run: every system is run or reported as failed, and the results
files are complete."""

import json
import subprocess
import sys

import pytest

from harness import ROOT

pytestmark = pytest.mark.e2e


def test_tiny_bench_run_writes_complete_results(tmp_path):
    out = tmp_path / "res"
    r = subprocess.run([sys.executable, "-m", "extproc", "bench", "--workload", "no-sharing", "--backends", "2",
                        "--duration", "3", "--grace", "10", "--rate", "2", "--seed", "3",
                        "--systems", "envoy-rr,ai-lb:least_request,no-such-system", "--out", str(out)],
                       capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    by = {x["system"]: x for x in doc["results"]}
    assert set(by) == {"envoy-rr", "ai-lb:least_request", "no-such-system"}
    assert by["no-such-system"]["status"] == "failed" and "unknown system" in by["no-such-system"]["error"]
    for name in ("envoy-rr", "ai-lb:least_request"):
        x = by[name]
        assert x["status"] == "ok", x.get("error")
        s = x["summary"]
        assert s["requests"] == x["planned_requests"] > 0 and s["failed"] == 0
        assert s["ttft_p50_s"] > 0 and s["e2e_p50_s"] >= s["ttft_p50_s"]
        assert len(x["requests"]) == s["requests"]
        assert "load-generator" in x["cpu"]["components"] and "sim" in x["cpu"]["components"]
        assert sum(s["served_by"].values()) == s["ok"] and "" not in s["served_by"]
        assert x["served_by_source"].startswith("response header x-aibench-upstream")
        assert sum(x["backend_requests"].values()) == s["ok"]  # the backends' own counters agree
        assert x["cache"]["state"] == "fresh" and x["prefix_cache"]["queries"] > 0
    assert "ai-lb" in by["ai-lb:least_request"]["cpu"]["components"]
    md = (out / "results.md").read_text()
    assert "**failed**" in md and "| envoy-rr |" in md
    assert (out / "ttft_cdf.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "throughput.png").exists()  # one load: no throughput plot
    assert "Against envoy-rr (the first system)" in md and "results in" in r.stdout
