"""The benchmark harness itself: workloads, client-side measurements, statistics, reports."""

import asyncio
import json

import pytest
from aiohttp import web

from aibench import loadgen, report, workloads


def test_workloads_are_deterministic_and_shaped():
    a = workloads.make("shared-prefix-small", 7, 20, 2.0)
    b = workloads.make("shared-prefix-small", 7, 20, 2.0)
    assert [c.turns[0].user for c in a.conversations] == [c.turns[0].user for c in b.conversations]
    assert a.conversations and all(c.start_s < 20 for c in a.conversations)
    # Groups share their system prompt; the history grows turn by turn.
    by_group = {}
    for c in a.conversations:
        by_group.setdefault(c.group, set()).add(c.system)
    assert all(len(s) == 1 for s in by_group.values()) and len(by_group) > 1
    c = max(a.conversations, key=lambda c: len(c.turns))
    sizes = [len(c.messages(k)) for k in range(len(c.turns))]
    assert sizes == [2 + 2 * k for k in range(len(c.turns))]
    assert c.messages(1)[2] == {"role": "assistant", "content": c.turns[0].answer}
    assert workloads.make("shared-prefix-small", 8, 20, 2.0).conversations[0].turns[0].user != a.conversations[0].turns[0].user


def test_rates_and_heavy_tails():
    w = workloads.make("no-sharing", 1, 200, 5.0)
    assert 800 < len(w.conversations) < 1200  # Poisson, mean 1000
    outs = sorted(c.turns[0].max_tokens for c in w.conversations)
    assert outs[-1] > 4 * outs[len(outs) // 2]  # heavy tail
    b = workloads.make("bursty", 1, 120, 5.0)
    assert 450 < len(b.conversations) < 750
    gaps = [y.start_s - x.start_s for x, y in zip(b.conversations, b.conversations[1:])]
    assert max(gaps) > 3.5  # off periods
    bh = workloads.make("bursty-heavy", 1, 120, 5.0)   # the queue's overload: bursts of heavy-tailed requests
    assert 450 < len(bh.conversations) < 750
    assert max(y.start_s - x.start_s for x, y in zip(bh.conversations, bh.conversations[1:])) > 3.5
    houts = sorted(c.turns[0].max_tokens for c in bh.conversations)
    assert houts[0] >= 32 and houts[-1] > 10 * houts[len(houts) // 2]  # Pareto outputs
    assert workloads.WORKLOADS["bursty-heavy"].default_load == 1.3
    lp = workloads.make("long-prompt", 1, 10, 1.0)
    assert all(len(c.turns[0].user) >= 220 * 1024 for c in lp.conversations)
    with pytest.raises(ValueError, match="unknown workload"):
        workloads.make("nope", 1, 1, 1)


def test_percentiles_and_summary():
    assert loadgen.percentile([], 50) is None
    assert loadgen.percentile([3.0], 99) == 3.0
    assert loadgen.percentile([1, 2, 3, 4], 50) == 2.5
    assert loadgen.percentile(list(range(101)), 90) == 90
    rs = [loadgen.Result(0, 0, 0, status=200, ttft_s=0.1 * i, e2e_s=1.0, itl_s=0.01, output_tokens=10, served_by="a")
          for i in range(1, 11)]
    rs.append(loadgen.Result(1, 0, 0, status=503, error="HTTP 503"))
    rs.append(loadgen.Result(2, 0, 0, error="ClientConnectorError"))
    s = loadgen.summarize(rs, wall_s=10.0)
    assert (s["requests"], s["ok"], s["failed"]) == (12, 10, 2)
    assert s["errors"] == {"HTTP 503": 1, "ClientConnectorError": 1}
    assert s["ttft_p50_s"] == pytest.approx(0.55)
    assert s["throughput_rps"] == 1.0 and s["output_tokens_per_s"] == 10.0
    assert s["served_by"] == {"a": 10}


async def _sse_server(first_token_delay: float, gap: float, tokens: int):
    async def handler(req):
        body = await req.json()
        r = web.StreamResponse(headers={"content-type": "text/event-stream", "x-aibench-upstream": "fake"})
        await r.prepare(req)
        await r.write(b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n')
        await asyncio.sleep(first_token_delay)
        for i in range(tokens):
            if i:
                await asyncio.sleep(gap)
            await r.write(b'data: {"choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n')
        usage = {"prompt_tokens": 7, "completion_tokens": tokens, "total_tokens": 7 + tokens}
        await r.write(b"data: " + json.dumps({"choices": [], "usage": usage}, separators=(",", ":")).encode() + b"\n\n")
        await r.write(b"data: [DONE]\n\n")
        assert body["stream"] is True
        return r

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


@pytest.mark.asyncio
async def test_client_measures_ttft_from_first_text_chunk_not_the_role_chunk():
    runner, port = await _sse_server(first_token_delay=0.2, gap=0.05, tokens=5)
    try:
        w = workloads.Workload("t", 1, 1.0, 1.0, [workloads.Conversation(0.0, None, [workloads.Turn("hi", 5)], cid=0)])
        results, wall = await loadgen.run(f"http://127.0.0.1:{port}", w, grace_s=5)
    finally:
        await runner.cleanup()
    (r,) = results
    assert r.ok and r.served_by == "fake"
    assert 0.18 < r.ttft_s < 0.6            # the 0.2 s wait, not the role chunk at ~0
    assert 0.04 < r.itl_s < 0.2             # 4 gaps of 0.05 s over 4 tokens
    assert (r.prompt_tokens, r.output_tokens) == (7, 5)


@pytest.mark.asyncio
async def test_run_is_bounded_and_failures_are_counted():
    runner, port = await _sse_server(first_token_delay=5.0, gap=0.0, tokens=1)  # hangs past the bound
    try:
        convs = [workloads.Conversation(0.0, None, [workloads.Turn("a", 1), workloads.Turn("b", 1)], cid=0)]
        w = workloads.Workload("t", 1, 0.5, 1.0, convs)
        results, wall = await loadgen.run(f"http://127.0.0.1:{port}", w, grace_s=0.5)
        bad = workloads.Workload("t", 1, 0.5, 1.0, [workloads.Conversation(0.0, None, [workloads.Turn("a", 1)], cid=1)])
        refused, _ = await loadgen.run("http://127.0.0.1:1", bad, grace_s=1)
    finally:
        await runner.cleanup()
    assert wall < 3
    assert [r.error for r in results] == ["timeout"]   # the second turn never started
    assert refused[0].error and not refused[0].ok


def fake_run(ok_systems=("envoy-rr", "ai-lb:prefix_cache"), failed=("sglang-router",)):
    results = []
    for i, s in enumerate(ok_systems):
        reqs = [loadgen.Result(0, 0, 0, status=200, ttft_s=0.05 * (j + 1 + i), e2e_s=0.5, itl_s=0.01, output_tokens=4).to_dict()
                for j in range(20)]
        results.append({"system": s, "load": 0.5, "offered_rps": 2.0, "status": "ok",
                        "summary": loadgen.summarize([loadgen.Result(**r) for r in reqs], 10.0),
                        "cpu": {"components": {"envoy": {"cpu_s": 1.0, "cores": 0.1}}, "machine_busy_mean": 0.4,
                                "saturated": s == "envoy-rr"},
                        "prefix_hit_rate": 0.5 + 0.1 * i, "requests": reqs})
    for s in failed:
        results.append({"system": s, "load": 0.5, "offered_rps": 2.0, "status": "failed", "error": "RuntimeError: no binary"})
    return {"meta": {"workload": "shared-prefix", "seed": 1, "duration_s": 10, "backends": 4, "capacity_rps": 4.0},
            "results": results}


def test_report_files_are_complete_and_failures_reported(tmp_path):
    files = report.write(fake_run(), tmp_path)
    names = sorted(f.name for f in files)
    assert names == ["results.json", "results.md", "ttft_cdf.png"]  # one load: no throughput plot
    assert all(f.stat().st_size > 0 for f in files)
    assert json.loads((tmp_path / "results.json").read_text())["results"][2]["status"] == "failed"
    md = (tmp_path / "results.md").read_text()
    assert "| sglang-router | 0.50 | **failed**: RuntimeError: no binary" in md
    assert "| ai-lb:prefix_cache | 0.50 | ok | 20 / 20 (-) | 0 |" in md
    assert "60.0%" in md  # prefix hit rate column
    assert "machine was saturated during: envoy-rr" in md
    assert (tmp_path / "ttft_cdf.png").read_bytes()[:4] == b"\x89PNG"
