"""Reports: the comparison against the first system, carried-over hit rates, degraded and
failed rows, the throughput plot only with several loads, and ``ai-lb bench compare``."""

import json

from aibench import compare, loadgen, report


def entry(system, load, ttft, hit, status="ok", cache=None, notes=()):
    reqs = [loadgen.Result(0, j, 0, status=200, ttft_s=ttft * (1 + j / 10), e2e_s=1.0, output_tokens=4,
                           itl_s=ttft / 10) for j in range(10)]
    return {"system": system, "load": load, "offered_rps": 10 * load, "status": status, "planned_requests": 10,
            "summary": loadgen.summarize(reqs, 10.0, slo_ttft_s=0.5), "prefix_hit_rate": hit,
            "cpu": {"components": {"envoy": {"cpu_s": 1.0, "cores": 0.1}}, "machine_busy_mean": 0.3},
            "cache": cache or {"state": "fresh"}, "notes": list(notes), "requests": [r.to_dict() for r in reqs]}


def run(results, **meta):
    return {"meta": {"workload": "w", "seed": 1, "duration_s": 10, "backends": 2, **meta}, "results": results}


def test_comparison_against_the_first_system_at_each_load(tmp_path):
    rs = [entry("envoy-rr", 0.5, 0.2, 0.5), entry("ai-lb:prefix_cache", 0.5, 0.1, 0.75),
          {"system": "sglang-router", "load": 0.5, "offered_rps": 5, "status": "failed", "error": "RuntimeError: x"},
          entry("envoy-rr", 0.9, 0.4, 0.5), entry("ai-lb:prefix_cache", 0.9, 0.6, 0.25)]
    md = report.markdown(run(rs))
    assert "Against envoy-rr (the first system)" in md
    assert "| ai-lb:prefix_cache | 0.50 | 0.50x | 0.50x | 0.50x | 1.00x | 1.50x |" in md  # ITL p90 next to TTFT
    assert "| ai-lb:prefix_cache | 0.90 | 1.50x | 1.50x | 1.50x | 1.00x | 0.50x |" in md
    assert "| sglang-router | 0.50 | **failed**: RuntimeError: x |" in md
    assert sorted(f.name for f in report.write(run(rs), tmp_path)) == \
        ["results.json", "results.md", "throughput.png", "ttft_cdf.png"]  # two loads: throughput plot
    one = tmp_path / "one"
    assert "throughput.png" not in {f.name for f in report.write(run(rs[:2]), one)}


def test_carried_over_degraded_and_notes():
    rs = [entry("envoy-rr", 0.5, 0.2, 0.5, cache={"state": "carried over", "failed": {"a": "HTTP 404"}}),
          entry("oracle", 0.5, 0.2, 0.6, status="degraded", notes=["3 of 9 decisions could not probe any backend"])]
    md = report.markdown(run(rs, cache_policy="Prefix caches could NOT be reset."))
    assert "50.0% (carried over)" in md and "| oracle | 0.50 | **degraded** |" in md
    assert "* oracle (0.50): 3 of 9 decisions could not probe any backend" in md
    assert "Prefix caches could NOT be reset." in md


def test_compare_two_result_folders(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    report.write(run([entry("envoy-rr", 0.5, 0.2, 0.5), entry("ai-lb:x", 0.5, 0.2, 0.5)]), a)
    report.write(run([entry("envoy-rr", 0.5, 0.1, 0.5), entry("oracle", 0.5, 0.2, 0.5)], seed=2), b)
    assert compare.main([str(a), str(b), "--out", str(tmp_path / "d.md")]) == 0
    out = capsys.readouterr().out
    assert "Setups differ: seed: 1 -> 2" in out
    assert "| envoy-rr | 0.50 | ok | 290 -> 145 (0.50x) |" in out
    assert "Only in" in out and "ai-lb:x (0.50)" in out and "oracle (0.50)" in out
    assert (tmp_path / "d.md").read_text() == out
    d = json.loads((a / "results.json").read_text())
    assert compare.diff(d, d).count("(1.00x)") >= 4
