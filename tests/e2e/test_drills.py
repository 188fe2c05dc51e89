"""Short versions of the failure drills and the body fuzz run (full runs: docs/reliability.md).

Both start their own stack (simulators, the reference Envoy, ai-lb, redis-server) on
loopback and stop it; each is bounded in time.
"""

from __future__ import annotations

import pytest

from aibench import drill, fuzz

pytestmark = pytest.mark.e2e


def test_failure_drills_meet_their_targets(tmp_path, capsys):
    """A hung Redis (SIGSTOP): no client sees a failure, ai-lb decides with local counts; a
    backend killed: only streams already flowing on it fail (non-streaming requests are
    retried); every in-flight count (ai-lb's and Redis's) is back to 0 afterwards. (ai-lb
    killed and Redis killed have their own end-to-end tests: test_gateway.py,
    test_global_least_request.py; `python -m aibench.drill` runs all four.)"""
    out = tmp_path / "drills.json"
    rc = drill.main(["--drills", "redis-stop,backend-kill", "--seconds", "3", "--concurrency", "12",
                     "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    import json

    results = {r["drill"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"redis-stop", "backend-kill"}
    assert results["redis-stop"]["failed"] == 0, text
    assert results["redis-stop"]["local_picks"] > 0  # Redis really was out, and ai-lb decided locally
    bk = results["backend-kill"]
    assert bk["failed_json"] == 0 and bk["failed"] <= bk["target_inflight"], text
    for r in results.values():
        assert r["ai_lb_inflight_after"] == 0 and r["redis_counts_after"] == 0, text


def test_body_fuzz_short_run_no_crash_no_hang():
    r = fuzz.run(2000, seed=2, concurrency=16, quiet=True)
    assert r["bodies"] == 2000
    assert not r["ai_lb_crashed"], r["logs"]
    assert r["hangs"] == 0 and not r["client_errors"], r
    assert not r["ai_lb_outcomes"].get("policy_error"), r["ai_lb_outcomes"]  # every bad body has its reason
    ext = r["envoy_ext_proc"]
    assert ext["streams_started"] >= 1900 and ext.get("streams_failed", 0) == 0, ext
    # A body that hung ai-lb's event loop would time out every later message (0.3 s each);
    # allow a few for a machine shared with other work.
    assert ext.get("message_timeouts", 0) <= 10, ext
    assert set(r["by_kind"]) == set(fuzz.KINDS)
