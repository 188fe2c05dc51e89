"""Replay loaders (no processes): trace text reproduces prefix sharing exactly and has the
trace's lengths; the time options (window, sample, speed, duration) and request logs."""

import json
import random

import pytest

from aibench import replay
from aibench.traffic import CHARS_PER_TOKEN
from harness import ROOT
from vllmsim.tokenizer import render_chat, tokenize

EXCERPT = ROOT / "tests" / "data" / "mooncake_excerpt.jsonl"


def rows():
    return [json.loads(x) for x in EXCERPT.read_text().splitlines()]


def test_trace_blocks_are_text_of_their_hash_id():
    b = replay.BlockText(16)
    assert b.block(7) == replay.BlockText(16).block(7) and len(b.block(7)) == 16 * CHARS_PER_TOKEN
    assert b.block(7) != b.block(8) and b.block(7)[:3] != b.block(8)[:3]
    assert all(ch.islower() or ch == " " for ch in b.block(123456))
    assert len(tokenize(b.block(99))) == 16  # exactly 4 characters per token


@pytest.mark.parametrize("scale", [1 / 32, 1 / 8])
def test_trace_prompts_have_the_scaled_lengths_and_share_what_the_ids_share(scale):
    w = replay.make(f"trace:{EXCERPT}", 1, 0, replay.ReplayOptions(speed=1.0, token_scale=scale))
    rs = rows()
    assert w.requests == len(rs) and [c.turns[0].ref for c in w.conversations] == list(range(1, len(rs) + 1))
    bodies = [c.request(0)[1] for c in w.conversations]
    for r, body in zip(rs, bodies):
        b, p, o = replay.scaled_lengths(r, scale)
        assert b == round(512 * scale) and body["max_tokens"] == o and body["ignore_eos"] is True
        assert len(tokenize(body["messages"][0]["content"])) == p
    # Two rows share exactly their common leading hash ids' text.
    a, c = next((x, y) for x in range(len(rs)) for y in range(x + 1, len(rs))
                if rs[x]["hash_ids"][0] == rs[y]["hash_ids"][0])
    k = 0
    while rs[a]["hash_ids"][k] == rs[c]["hash_ids"][k]:
        k += 1
    ta, tc = (bodies[i]["messages"][0]["content"] for i in (a, c))
    n = 0
    while n < min(len(ta), len(tc)) and ta[n] == tc[n]:
        n += 1
    assert k * round(512 * scale) * CHARS_PER_TOKEN <= n < (k * round(512 * scale) + 2) * CHARS_PER_TOKEN


def test_predicted_hits_agree_with_vllm_block_hashes():
    """predicted_hits (from hash ids) == an unbounded cache of the simulator's own block hashes."""
    from vllmsim.kvcache import block_hashes

    scale = 1 / 32
    w = replay.make(f"trace:{EXCERPT}", 1, 0, replay.ReplayOptions(speed=1.0, token_scale=scale))
    cached: set = set()
    hits = 0
    for c in w.conversations:
        toks = tokenize(render_chat(c.request(0)[1]["messages"]))
        hs = block_hashes(toks, 16, None)
        n = 0
        while n < len(hs) and hs[n] in cached and (n + 1) * 16 <= len(toks) - 1:
            n += 1
        hits += n * 16
        cached.update(hs)
    assert replay.predicted_hits(rows(), scale) == hits


def test_time_options():
    rs = rows()
    t = [(r["timestamp"] - rs[0]["timestamp"]) / 1000 for r in rs]
    full = replay.make(f"trace:{EXCERPT}", 1, 0, replay.ReplayOptions(speed=1.0))
    assert [c.turns[0].at_s for c in full.conversations] == pytest.approx(t)
    fast = replay.make(f"trace:{EXCERPT}", 1, 0, replay.ReplayOptions(speed=4.0))
    assert [c.turns[0].at_s for c in fast.conversations] == pytest.approx([x / 4 for x in t])
    # From a rate: 40 conversations over the recording's span, asked at 8 per second.
    by_rate = replay.make(f"trace:{EXCERPT}", 1, 8.0, replay.ReplayOptions())
    assert by_rate.info["speed"] == pytest.approx(8.0 / (len(rs) / t[-1]), rel=1e-3)
    win = replay.make(f"trace:{EXCERPT}", 1, 0, replay.ReplayOptions(speed=1.0, window=(2.0, 6.0)))
    assert [c.turns[0].ref for c in win.conversations] == [i + 1 for i, x in enumerate(t) if 2.0 <= x < 6.0]
    assert win.conversations[0].turns[0].at_s == pytest.approx(t[win.conversations[0].turns[0].ref - 1] - 2.0)
    cut = replay.make(f"trace:{EXCERPT}", 1, 0, replay.ReplayOptions(speed=1.0, duration=3.0))
    assert cut.duration_s == 3.0 and all(c.turns[0].at_s <= 3.0 for c in cut.conversations)
    half = replay.make(f"trace:{EXCERPT}", 3, 0, replay.ReplayOptions(speed=1.0, sample=0.5))
    again = replay.make(f"trace:{EXCERPT}", 3, 0, replay.ReplayOptions(speed=1.0, sample=0.5))
    assert 10 < half.requests < 30 and [c.cid for c in half.conversations] == [c.cid for c in again.conversations]
    assert replay.parse_window("10:70") == (10.0, 70.0) and replay.parse_window(":5") == (0.0, 5.0)
    with pytest.raises(ValueError, match="END must be after START"):
        replay.parse_window("5:1")


def test_request_log_sessions_times_and_errors(tmp_path):
    f = tmp_path / "log.jsonl"
    docs = [{"t": "2026-01-01T10:00:00Z", "session": 7, "body": {"messages": [{"role": "user", "content": "a"}]}},
            {"t": "2026-01-01T10:00:02.5Z", "body": {"prompt": "b", "max_tokens": 3}},
            {"t": "2026-01-01T10:00:01Z", "session": 7, "body": {"messages": [{"role": "user", "content": "c"}]}}]
    f.write_text("\n".join(json.dumps(d) for d in docs) + "\n\n")
    w = replay.make(f"requests:{f}", 1, 0, replay.ReplayOptions(speed=1.0))
    assert [(c.session, [t.ref for t in c.turns]) for c in w.conversations] == [("7", [1, 3]), (None, [2])]
    assert [t.at_s for t in w.conversations[0].turns] == [0.0, 1.0] and w.conversations[1].turns[0].at_s == 2.5
    assert w.conversations[1].request(0) == ("/v1/completions", {"prompt": "b", "max_tokens": 3})
    body = w.conversations[0].request(0)[1]
    body["messages"].append("mutated")
    assert w.conversations[0].request(0)[1]["messages"] == [{"role": "user", "content": "a"}]  # a copy each time
    for bad, msg in (({"body": {"messages": []}}, "missing 't'"), ({"t": 1, "body": {"x": 1}}, "'body' must be"),
                     ({"t": "yesterday", "body": {"prompt": "x"}}, "ISO-8601")):
        f.write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=msg):
            replay.make(f"requests:{f}", 1, 0, replay.ReplayOptions(speed=1.0))
    with pytest.raises(ValueError, match="trace-token-scale"):
        replay.make(f"requests:{f}", 1, 0, replay.ReplayOptions(token_scale=0.5))
    f.write_text('{"timestamp": 0}\n')
    with pytest.raises(ValueError, match="not a Mooncake trace row"):
        replay.make(f"trace:{f}", 1, 0, replay.ReplayOptions())


def test_sampling_request_logs_keeps_whole_sessions(tmp_path):
    f = tmp_path / "log.jsonl"
    rng = random.Random(0)
    lines = [{"t": i * 0.1, "session": f"s{rng.randrange(20)}", "body": {"prompt": str(i)}} for i in range(200)]
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    w = replay.make(f"requests:{f}", 2, 0, replay.ReplayOptions(speed=1.0, sample=0.5))
    kept = {c.session for c in w.conversations}
    assert 3 < len(kept) < 17
    assert w.requests == sum(1 for x in lines if x["session"] in kept)


def test_trace_scaling_reaches_the_simulator():
    from aibench import runner

    plan = runner.Plan(workload=f"trace:{EXCERPT}", replay=replay.ReplayOptions(token_scale=0.25))
    args = runner.sim_args_for(plan, ["--stream-chunk-tokens", "4"])
    # The default profile's 28,672 KV blocks scaled like the tokens; a context long enough for
    # the largest request; the user's flags last (they win).
    assert args[args.index("--num-gpu-blocks") + 1] == str(28672 // 4)
    assert int(args[args.index("--max-model-len") + 1]) >= plan.build(1.0).info["max_request_tokens"]
    assert args[-2:] == ["--stream-chunk-tokens", "4"]
    mine = runner.sim_args_for(plan, ["--num-gpu-blocks", "999"])
    assert mine.count("--num-gpu-blocks") == 1 and mine[-1] == "999"
    small = runner.Plan(workload=f"trace:{EXCERPT}", replay=replay.ReplayOptions(token_scale=1 / 32))
    assert "--max-model-len" not in runner.sim_args_for(small, [])  # fits the default 8k
    syn = runner.sim_args_for(runner.Plan(workload="shared-prefix"), ["--num-gpu-blocks", "4096"])
    assert syn == ["--num-gpu-blocks", "8192", "--num-gpu-blocks", "4096"]
