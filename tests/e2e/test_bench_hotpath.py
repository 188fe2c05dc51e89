"""aibench.hotpath: Envoy's bytes, recorded under load, replay into an in-process ai-lb that
routes every request Envoy sent and ends each one from the recorded access log (the ids
line up), so the CPU it reports is the real per-request work."""

import pytest

from aibench import hotpath

pytestmark = pytest.mark.e2e


def test_a_recording_replays_every_request_to_its_end(tmp_path):
    rec = tmp_path / "rr.rec"
    sent = hotpath.record(rec, "round_robin", seconds=1.5, wrk=False)  # Python clients: no wrk needed
    meta, reads = hotpath.load_recording(rec)
    assert sent > 50 and len(reads) > 50
    assert meta["policy"] == "round_robin" and len(meta["endpoints"]) == 4 and meta["prefix"].startswith(meta["nonce"])
    r = hotpath.replay(rec, reps=2)
    c = r["completions"]
    assert r["routed"] == sent                        # one ext_proc call per request, each routed once
    assert c["access_log"] + c["stream"] == sent      # ... and each one ended, by the log (or its held stream)
    assert c["access_log"] >= sent * 0.9 and c["expired"] == 0 and c["foreign"] == 0
    assert c["served_elsewhere"] == 0                 # the replay picked what the recorded log says served
    assert len(r["runs"]) == 2 and 0 < r["us_per_request"] < 10_000


def test_a_file_that_is_not_a_recording_is_refused(tmp_path):
    bad = tmp_path / "x.rec"
    bad.write_bytes(b"not a recording")
    with pytest.raises(ValueError, match="not a hotpath recording"):
        hotpath.load_recording(bad)
