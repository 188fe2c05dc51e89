"""Replays through a real Envoy: a Mooncake trace excerpt against the simulator (arrival
times, lengths and prefix-cache hits match what the trace's hash ids predict), and a log
of OpenAI requests against a vLLM stand-in (bodies, arrival times, sessions match the
file; its empty completions count as ok)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aibench import replay
from fake_vllm import FakeVllm
from harness import ROOT

pytestmark = pytest.mark.e2e
EXCERPT = ROOT / "tests" / "data" / "mooncake_excerpt.jsonl"
SCALE = 1 / 32     # 16-token blocks: 40 requests of ~900 tokens
SPEED = 2.0


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "extproc", "bench", "--grace", "10", "--slo-ttft-ms", "500", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def only_result(out: Path) -> dict:
    (res,) = json.loads((out / "results.json").read_text())["results"]
    assert res["status"] == "ok", res.get("error")
    return res


def test_trace_replay_matches_the_hash_ids(tmp_path):
    out = tmp_path / "res"
    # One server with room for every block, so the prediction (an unbounded cache) holds.
    r = bench("--workload", f"trace:{EXCERPT}", "--trace-token-scale", str(SCALE), "--replay-speed", str(SPEED),
              "--backends", "1", "--systems", "envoy-rr", "--out", str(out),
              "--sim-args", "--time-scale 0.05 --num-gpu-blocks 20000 --stream-chunk-tokens 8")
    assert r.returncode == 0, r.stderr[-3000:]
    res = only_result(out)
    rows = [json.loads(x) for x in EXCERPT.read_text().splitlines()]
    t0 = rows[0]["timestamp"]
    reqs = sorted(res["requests"], key=lambda x: x["ref"])
    assert [x["ref"] for x in reqs] == list(range(1, len(rows) + 1))
    for row, x in zip(rows, reqs):
        assert x["status"] == 200 and x["error"] is None
        _, p, o = replay.scaled_lengths(row, SCALE)
        assert x["prompt_tokens"] == p + 11          # the chat template adds 11 tokens
        assert x["output_tokens"] == o
        want = (row["timestamp"] - t0) / 1000 / SPEED
        assert x["scheduled_s"] == pytest.approx(want, abs=1e-6)
        assert want - 0.01 <= x["sent_s"] <= want + 0.3
    hits = res["prefix_cache"]["hits"]
    predicted = replay.predicted_hits(rows, SCALE)
    assert res["prefix_cache"]["queries"] == sum(x["prompt_tokens"] for x in reqs)
    # Requests with the same timestamp run concurrently: the second cannot hit blocks the first
    # is still computing, so the simulator may count a little less than the sequential prediction.
    assert 0.9 * predicted <= hits <= predicted, (hits, predicted)
    assert res["prefix_hit_rate"] > 0.4


def write_log(path: Path) -> list[dict]:
    lines = [
        {"t": 100.0, "session": "alice", "body": {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 5, "temperature": 0.2}},
        {"t": 100.4, "body": {"model": "gpt-x", "prompt": "once upon a time", "max_tokens": 3, "stream": False}},
        {"t": 100.9, "session": "bob", "body": {"model": "gpt-x", "messages": [{"role": "system", "content": "be brief"},
                                                                               {"role": "user", "content": "why"}]}},
        {"t": 101.5, "session": "alice", "body": {"model": "gpt-x", "messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": ""},
            {"role": "user", "content": "and then?"}], "max_tokens": 7, "user": "u1"}},
        {"t": 102.2, "session": "bob", "path": "/v1/chat/completions",
         "body": {"model": "gpt-x", "messages": [{"role": "user", "content": "ok"}], "max_tokens": 2}},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return lines


def test_request_log_replay_matches_the_file(tmp_path):
    log = tmp_path / "requests.jsonl"
    lines = write_log(log)
    out = tmp_path / "res"
    with FakeVllm() as srv:
        r = bench("--workload", f"requests:{log}", "--backend-urls", srv.address, "--replay-speed", "1",
                  "--systems", "envoy-rr", "--out", str(out))
        received = list(srv.received)
        resets = srv.resets
    assert r.returncode == 0, r.stderr[-3000:]
    res = only_result(out)
    s = res["summary"]
    # Every answer was an empty completion: all ok, none a failure.
    assert s["ok"] == s["requests"] == len(lines) and s["failed"] == 0 and s["empty_completions"] == len(lines)
    assert resets == 1 and res["cache"]["state"] == "reset"
    assert json.loads((out / "results.json").read_text())["meta"]["model"] == "tiny-random"  # from /v1/models
    assert len(received) == len(lines)
    # Bodies: as recorded, except the model and the streaming fields the bench sets.
    for (_, path, headers, body), line in zip(received, lines):
        sent = {k: v for k, v in body.items() if k not in ("model", "stream", "stream_options")}
        want = {k: v for k, v in line["body"].items() if k not in ("model", "stream", "stream_options")}
        assert sent == want
        assert body["model"] == "tiny-random" and body["stream"] is True
        assert path == line.get("path") or path == ("/v1/chat/completions" if "messages" in line["body"]
                                                    else "/v1/completions")
        assert headers.get("x-session-id") == line.get("session")
    # Arrival times: the file's gaps, replayed at speed 1.
    t_recv = [t for t, *_ in received]
    for k in range(1, len(lines)):
        assert t_recv[k] - t_recv[0] == pytest.approx(lines[k]["t"] - lines[0]["t"], abs=0.15)
    # Sessions: one conversation per session, in file order; a request without one is alone.
    by_ref = {x["ref"]: x for x in res["requests"]}
    assert [by_ref[n]["session"] for n in range(1, 6)] == ["alice", None, "bob", "alice", "bob"]
    assert by_ref[1]["cid"] == by_ref[4]["cid"] != by_ref[3]["cid"] == by_ref[5]["cid"] != by_ref[2]["cid"]
    assert [by_ref[n]["turn"] for n in range(1, 6)] == [0, 0, 0, 1, 1]
