"""Synthetic workloads: seeded and deterministic, shaped as documented; the cache-pressured
shared-prefix workload really exceeds one server's cache; prompt capping keeps prefixes."""

import statistics

import pytest

from aibench import workloads
from aibench.traffic import CHARS_PER_TOKEN, cap_prompt

KV_8192_BLOCKS = 8192 * 16  # the KV capacity the bench gives the simulator for shared-prefix


def prompts(w):
    return [c.request(k) for c in w.conversations for k in range(len(c.turns))]


@pytest.mark.parametrize("name", sorted(workloads.WORKLOADS))
def test_every_workload_is_seeded_and_deterministic(name):
    dur, rate = (6, 0.5) if name == "long-prompt" else (10, 2.0)
    a, b = workloads.make(name, 5, dur, rate), workloads.make(name, 5, dur, rate)
    assert a.conversations and prompts(a) == prompts(b)
    assert [c.start_s for c in a.conversations] == [c.start_s for c in b.conversations]
    assert prompts(workloads.make(name, 6, dur, rate)) != prompts(a)
    assert all(0 <= c.start_s < dur for c in a.conversations)


@pytest.mark.parametrize("backends", [1, 2, 4, 8])
def test_shared_prefix_is_cache_pressured(backends):
    w = workloads.make("shared-prefix", 1, 30, backends * 1.0, env={"backends": backends, "kv_tokens": KV_8192_BLOCKS})
    info = w.info
    # More distinct prefix tokens than one server can cache ...
    assert info["groups"] * info["system_tokens"] > 1.4 * KV_8192_BLOCKS
    # ... and a 30 s run at about 0.9 of such a fleet's capacity sends more (prompts + histories).
    if backends >= 2:
        assert workloads.distinct_prefix_tokens(w) > KV_8192_BLOCKS
    # ... but the groups scale with the fleet, so a router that partitions them can hit.
    assert info["groups"] >= 0.6 * backends * info["groups_one_server_holds"]
    # Skewed popularity: the top group is far more popular than the median one.
    counts = {}
    for c in w.conversations:
        counts[c.group] = counts.get(c.group, 0) + 1
    ranked = sorted(counts.values(), reverse=True)
    assert ranked[0] > 5 * statistics.median(ranked)
    # Long multi-turn: histories grow up to 8 turns.
    assert max(len(c.turns) for c in w.conversations) == 8
    assert statistics.mean(len(c.turns) for c in w.conversations) > 4.5


def test_shared_prefix_sizes_groups_from_the_kv_capacity():
    small = workloads.make("shared-prefix", 1, 5, 1.0, env={"backends": 8, "kv_tokens": 65536})
    big = workloads.make("shared-prefix", 1, 5, 1.0, env={"backends": 8, "kv_tokens": 4 * 65536})
    assert big.info["groups"] > 3 * small.info["groups"]
    fixed = workloads.make("shared-prefix", 1, 5, 1.0, params={"groups": "12", "zipf_s": "1.5", "turns": "2,3"})
    assert fixed.info["groups"] == 12 and fixed.info["zipf_s"] == 1.5
    assert {len(c.turns) for c in fixed.conversations} <= {2, 3}
    with pytest.raises(ValueError, match="no parameter 'nope'"):
        workloads.make("shared-prefix", 1, 5, 1.0, params={"nope": "1"})


def test_shared_prefix_small_is_the_old_workload():
    w = workloads.make("shared-prefix-small", 1, 30, 2.0)
    assert w.info["groups"] == 8 and len({c.system for c in w.conversations}) == 8
    assert workloads.distinct_prefix_tokens(w, histories=False) < 20_000  # fits any server's cache


def test_no_sharing_heavy_has_heavy_tails_and_no_shared_prefix():
    w = workloads.make("no-sharing-heavy", 1, 300, 5.0)
    ps = sorted(len(c.turns[0].user) // CHARS_PER_TOKEN for c in w.conversations)
    outs = sorted(c.turns[0].max_tokens for c in w.conversations)
    assert ps[int(0.99 * len(ps))] > 8 * ps[len(ps) // 2]
    assert outs[int(0.99 * len(outs))] > 10 * outs[len(outs) // 2]
    assert max(ps) + max(outs) <= 8192  # fits the default 8k context
    assert len({c.turns[0].user[:24] for c in w.conversations}) == len(w.conversations)  # unique starts
    assert workloads.WORKLOADS["no-sharing-heavy"].default_load >= 0.9


def test_long_chat_is_long_multi_turn_unshared_and_fits_8k():
    w = workloads.make("long-chat", 1, 120, 1.0)
    docs = [len(c.system) // CHARS_PER_TOKEN for c in w.conversations]
    assert 2500 < statistics.median(docs) < 3500 and max(docs) <= 5000 + 3  # + "[doc i] "
    assert len({c.system[:16] for c in w.conversations}) == len(w.conversations)  # a document each
    assert all(2 <= len(c.turns) <= 4 for c in w.conversations)
    assert min(t.max_tokens for c in w.conversations for t in c.turns) >= 100  # long answers: decode matters
    for c in w.conversations:  # the last turn (document + history + answer) fits an 8k context
        last = sum(len(m["content"]) for m in c.request(len(c.turns) - 1)[1]["messages"]) // CHARS_PER_TOKEN
        assert last + c.turns[-1].max_tokens + 60 < 8192


def test_cap_prompt_keeps_the_beginning():
    msgs = [{"role": "system", "content": "s" * 400}, {"role": "user", "content": "u" * 400},
            {"role": "assistant", "content": "a" * 400}, {"role": "user", "content": "v" * 400}]
    body = {"messages": [dict(m) for m in msgs]}
    assert cap_prompt(body, 150)
    text = "".join(m["content"] for m in body["messages"])
    assert text == ("s" * 400 + "u" * 400)[:len(text)] and len(text) <= 150 * CHARS_PER_TOKEN
    assert not cap_prompt({"messages": [{"role": "user", "content": "short"}]}, 150)
    p = {"prompt": "x" * 1000}
    assert cap_prompt(p, 100) and p["prompt"] == "x" * 400
    ids = {"prompt": list(range(500))}
    assert cap_prompt(ids, 100) and ids["prompt"] == list(range(100))
    # A capped conversation still shares its prefix turn after turn.
    w = workloads.make("shared-prefix-small", 2, 10, 1.0)
    c = max(w.conversations, key=lambda c: len(c.turns))
    caps = [c.request(k, 300)[1]["messages"] for k in range(len(c.turns))]
    assert all(x[0] == caps[0][0] for x in caps)


def test_cli_refuses_unknown_workloads_and_missing_files(tmp_path, capsys):
    from aibench import cli

    assert cli.main(["--workload", "nope", "--out", str(tmp_path / "a")]) == 2
    assert cli.main(["--workload", f"trace:{tmp_path}/missing.jsonl", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "unknown workload 'nope'" in err and "missing.jsonl: no such file" in err
    assert not (tmp_path / "a").exists()
    text = cli.parser().format_help()
    assert "``" not in text and "(default: shared-prefix)" in text and "ai-lb:prefix_cache" in text
    assert "no-sharing-heavy" in text and "ai-lb bench compare A B" in text
