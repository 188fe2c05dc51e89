"""What the bench reads from servers, against in-process fakes: empty completions are ok,
cut streams are not, completions and sessions go out as asked; metrics parsing; which
cache reset a backend supports and what the report says when none works."""

import asyncio
from pathlib import Path

import pytest
from aiohttp import web

from aibench import backends as bk
from aibench import loadgen
from aibench.traffic import COMPLETIONS, Conversation, Turn, Workload

FIXTURE = Path("/work/shared/fixtures/vllm-0.32-metrics.txt")  # as tests/sim/conftest.py


async def serve(routes) -> tuple[web.AppRunner, int]:
    app = web.Application()
    for method, path, handler in routes:
        app.router.add_route(method, path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


def stream(chunks: list[bytes], seen: list | None = None):
    async def handler(req):
        if seen is not None:
            seen.append((req.path, dict(req.headers), await req.json()))
        r = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await r.prepare(req)
        for c in chunks:
            await r.write(c + b"\n\n")
            await asyncio.sleep(0.01)
        return r
    return handler


ROLE = b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}'
EMPTY_END = b'data: {"choices":[{"index":0,"delta":{"content":""},"finish_reason":"length"}]}'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}'
DONE = b"data: [DONE]"


async def one_run(chunks, turns=None, session=None, path="/v1/chat/completions"):
    seen: list = []
    runner, port = await serve([("POST", path, stream(chunks, seen))])
    try:
        c = Conversation(0.0, None, turns or [Turn("hi", 1)], cid=0, session=session)
        results, _ = await loadgen.run(f"http://127.0.0.1:{port}", Workload("t", 1, 0.5, 1.0, [c]), grace_s=3)
    finally:
        await runner.cleanup()
    return results, seen


@pytest.mark.asyncio
async def test_empty_completion_is_ok_with_the_servers_token_count():
    (r,), _ = await one_run([ROLE, EMPTY_END, USAGE, DONE])
    assert r.ok and r.empty and r.error is None and r.output_tokens == 1 and r.ttft_s is not None
    (r,), _ = await one_run([ROLE, EMPTY_END, DONE])  # no usage reported: 0 tokens
    assert r.ok and r.empty and r.output_tokens == 0
    s = loadgen.summarize([r], 1.0)
    assert s["ok"] == 1 and s["failed"] == 0 and s["empty_completions"] == 1


@pytest.mark.asyncio
async def test_cut_streams_and_stream_errors_fail():
    (r,), _ = await one_run([ROLE, b'data: {"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}'])
    assert not r.ok and r.error == "truncated"
    (r,), _ = await one_run([ROLE, b'data: {"error":{"message":"boom","code":500}}', DONE])
    assert not r.ok and r.error == "error in stream"


@pytest.mark.asyncio
async def test_completions_path_body_and_session_header():
    text = b'data: {"choices":[{"index":0,"text":" x","finish_reason":null}]}'
    end = b'data: {"choices":[{"index":0,"text":" y","finish_reason":"length"}]}'
    turn = Turn(body={"prompt": "tell me", "max_tokens": 2, "stream": False, "temperature": 0}, path=COMPLETIONS,
                at_s=0.0, ref=3)
    (r,), seen = await one_run([text, end, USAGE, DONE], turns=[turn], session="s1", path=COMPLETIONS)
    assert r.ok and not r.empty and r.session == "s1" and r.ref == 3 and r.scheduled_s == 0.0
    (path, headers, body), = seen
    assert path == COMPLETIONS and headers["x-session-id"] == "s1"
    assert body == {"prompt": "tell me", "max_tokens": 2, "stream": True, "temperature": 0, "model": "sim-model",
                    "stream_options": {"include_usage": True}}


def test_summary_counts_failures_by_status_and_goodput():
    rs = [loadgen.Result(0, 0, 0, status=200, ttft_s=t, e2e_s=1.0) for t in (0.1, 0.2, 1.5)]
    rs += [loadgen.Result(1, 0, 0, status=429, error="HTTP 429"), loadgen.Result(2, 0, 0, status=503, error="HTTP 503"),
           loadgen.Result(3, 0, 0, status=429, error="HTTP 429"), loadgen.Result(4, 0, 0, error="timeout")]
    s = loadgen.summarize(rs, 2.0, slo_ttft_s=1.0)
    assert s["by_status"] == {"200": 3, "429": 2, "503": 1, "timeout": 1} and s["shed"] == 2
    assert s["good"] == 2 and s["goodput_rps"] == 1.0 and s["good_fraction"] == pytest.approx(2 / 7)


def test_metrics_parsing_on_a_real_vllm_page():
    if not FIXTURE.exists():
        pytest.skip(f"{FIXTURE} not here")
    m = bk.parse_metrics(FIXTURE.read_text())
    assert m.flavor == "vllm" and m.get(1) > 0 and m.get(0) > 0 and m.get(2) > 0
    info = m.info["vllm:cache_config_info"]
    assert info["block_size"].isdigit() and info["num_gpu_blocks"].isdigit()
    sg = bk.parse_metrics('sglang:cached_tokens_total{a="b"} 5\nsglang:prompt_tokens_total 20\n'
                          'sglang:num_requests_total 2\n# x\nsglang:num_running_reqs{m="x"} 1\n')
    assert sg.flavor == "sglang" and (sg.get(0), sg.get(1), sg.get(2), sg.get(3)) == (5, 20, 2, 1)


async def _resets(answers: dict[str, tuple[int, str]]) -> tuple[dict, dict]:
    async def make(path):
        async def h(req):
            code, text = answers[path]
            return web.Response(status=code, text=text)
        return h
    routes = [("POST", p, await make(p)) for p in answers]
    routes.append(("GET", "/metrics", _metrics))
    runner, port = await serve(routes)
    try:
        methods: dict = {}
        rep = await bk._reset_all([f"127.0.0.1:{port}"], methods, timeout=1.0)
    finally:
        await runner.cleanup()
    return rep, methods


async def _metrics(req):
    return web.Response(text="vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n")


@pytest.mark.asyncio
async def test_reset_detection():
    rep, m = await _resets({"/reset_prefix_cache": (200, '{"success":true}')})
    assert rep["state"] == "reset" and rep["methods"] == ["vllm"] and list(m.values()) == ["vllm"]
    rep, m = await _resets({"/flush_cache": (200, "Cache flushed.")})
    assert rep["state"] == "reset" and rep["methods"] == ["sglang"]
    rep, m = await _resets({"/other": (200, "")})  # neither endpoint: a real vLLM without dev mode
    assert rep["state"] == "carried over" and list(m.values()) == [None]
    (why,) = rep["failed"].values()
    assert "HTTP 404" in why and "VLLM_SERVER_DEV_MODE=1" in why
    rep, _ = await _resets({"/reset_prefix_cache": (200, '{"success": false}')})  # blocks held for the whole wait
    assert rep["state"] == "carried over" and "blocks in use" in next(iter(rep["failed"].values()))


@pytest.mark.asyncio
async def test_oracle_counts_decisions_it_could_not_make():
    from aibench import oracle as orc
    from aibench.systems import Oracle

    async def not_found(req):
        return web.Response(status=404)
    runner, port = await serve([("POST", "/sim/match", not_found), ("GET", "/sim/state", not_found)])
    try:
        addr = f"127.0.0.1:{port}"
        assert await orc.not_simulators([addr]) == [addr]
        o = orc.Oracle([addr])
        await o.open()
        try:
            picked, _ = await o.choose(b'{"model":"m","messages":[{"role":"user","content":"hi"}]}')
        finally:
            await o.close()
    finally:
        await runner.cleanup()
    assert picked == addr and (o.decisions, o.probe_failures) == (1, 1)
    s = Oracle()
    s._stats0 = {"decisions": 2, "probe_failures": 0}
    s._stats = lambda: {"decisions": 12, "probe_failures": 4}
    assert s.verdict() == ("degraded", ["4 of 10 decisions could not probe any backend and went round robin"])
    s._stats = lambda: {"decisions": 12, "probe_failures": 0}
    assert s.verdict() == ("ok", [])
