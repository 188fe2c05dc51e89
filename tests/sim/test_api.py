"""OpenAI API surface: SSE byte format against the real vLLM fixtures, errors, models."""
from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from vllmsim import SimCluster


def shape(obj: Any) -> Any:
    """Key order (recursively) of a JSON value; values other than containers are dropped."""
    if isinstance(obj, dict):
        return [(k, shape(v)) for k, v in obj.items()]
    if isinstance(obj, list):
        return [shape(obj[0])] if obj else []
    return None


def fixture_events(sim, name: str) -> list[Any]:
    return sim.sse_events((sim.FIXTURES / name).read_text())


@pytest.mark.asyncio
async def test_chat_stream_matches_vllm_fixture(sim) -> None:
    ref = fixture_events(sim, "vllm-0.32-chat-stream.txt")
    ref_usage = fixture_events(sim, "vllm-0.32-completions-stream.txt")[-2]
    # Real time: at a small time-scale a busy client may get several tokens per chunk.
    async with SimCluster(1, config=sim.make_config(1.0)) as c, aiohttp.ClientSession() as s:
        status, headers, raw = await sim.chat(s, c.urls[0], "hello", max_tokens=5, stream=True,
                                              stream_options={"include_usage": True})
        assert status == 200
        assert headers["Content-Type"].startswith("text/event-stream")
        assert headers["x-sim-server"] == str(c.ports[0])
        ev = sim.sse_events(raw)
    assert ev[-1] == "[DONE]" and ref[-1] == "[DONE]"
    role, tokens, final, usage = ev[0], ev[1:-3], ev[-3], ev[-2]
    assert shape(role) == shape(ref[0])
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(tokens) == 4 and all(shape(t) == shape(ref[1]) for t in tokens)
    assert shape(final) == shape(ref[-2])
    assert final["choices"][0]["finish_reason"] == "length"
    # Usage chunk: same layout as vLLM's completions usage chunk, chat object name.
    assert shape(usage) == shape(ref_usage)
    assert usage["object"] == "chat.completion.chunk" and usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 5
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + 5
    assert len({e["id"] for e in ev[:-1]}) == 1 and ev[0]["id"].startswith("chatcmpl-")
    # Raw bytes: compact JSON separators exactly like vLLM.
    assert raw.startswith('data: {"id":"chatcmpl-') and raw.endswith("data: [DONE]\n\n")


@pytest.mark.asyncio
async def test_completions_stream_matches_vllm_fixture(sim) -> None:
    ref = fixture_events(sim, "vllm-0.32-completions-stream.txt")
    async with SimCluster(1, config=sim.make_config(1.0)) as c, aiohttp.ClientSession() as s:
        body = {"prompt": "once upon a time", "max_tokens": 5, "stream": True,
                "stream_options": {"include_usage": True}}
        async with s.post(f"{c.urls[0]}/v1/completions", json=body) as r:
            assert r.status == 200
            ev = sim.sse_events(await r.text())
        async with s.post(f"{c.urls[0]}/v1/completions", json={**body, "stream_options": None}) as r:
            no_usage = sim.sse_events(await r.text())
    assert [shape(e) for e in ev] == [shape(e) for e in ref]
    assert ev[-3]["choices"][0]["finish_reason"] == "length"
    assert all(e["choices"][0]["finish_reason"] is None for e in ev[:-3])
    assert ev[-2]["usage"]["completion_tokens"] == 5
    assert no_usage[-1] == "[DONE]" and "usage" not in no_usage[-2]


@pytest.mark.asyncio
async def test_stream_chunk_tokens_groups_tokens(sim) -> None:
    cfg = sim.make_config(1.0, stream_chunk_tokens=4)
    async with SimCluster(1, config=cfg) as c, aiohttp.ClientSession() as s:
        _, _, raw = await sim.chat(s, c.urls[0], "hi", max_tokens=16, stream=True)
        _, _, full = await sim.chat(s, c.urls[0], "hi", max_tokens=16)
    ev = sim.sse_events(raw)
    content = [e for e in ev[1:] if e != "[DONE]"]
    assert 4 <= len(content) <= 6  # ~16/4 chunks (first token is sent alone)
    text = "".join(e["choices"][0]["delta"]["content"] for e in content)
    assert len(text.split()) == 16
    assert len(full["choices"][0]["message"]["content"].split()) == 16


@pytest.mark.asyncio
async def test_non_streaming_answers_with_usage(sim) -> None:
    async with SimCluster(1, config=sim.make_config()) as c, aiohttp.ClientSession() as s:
        status, headers, body = await sim.chat(s, c.urls[0], "hello", max_tokens=7)
        assert status == 200 and headers["x-sim-server"] == str(c.ports[0])
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 7
        assert len(body["choices"][0]["message"]["content"].split()) == 7
        # Deterministic: same seed -> same text for the same request position.
        async with s.post(f"{c.urls[0]}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 2}) as r:
            comp = await r.json()
        assert comp["object"] == "text_completion" and comp["usage"]["prompt_tokens"] == 3
        # max_completion_tokens wins over max_tokens; default applies when both absent.
        _, _, b2 = await sim.chat(s, c.urls[0], "x", max_tokens=50, max_completion_tokens=3)
        assert b2["usage"]["completion_tokens"] == 3
        async with s.post(f"{c.urls[0]}/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "x"}]}) as r:
            assert (await r.json())["usage"]["completion_tokens"] == 16
        async with s.get(f"{c.urls[0]}/health") as r:
            assert r.status == 200 and r.headers["x-sim-server"] == str(c.ports[0])
        async with s.get(f"{c.urls[0]}/v1/models") as r:
            models = await r.json()
        assert [m["id"] for m in models["data"]] == ["sim-model"]


@pytest.mark.asyncio
async def test_text_is_deterministic_for_a_seed(sim) -> None:
    texts = []
    for _ in range(2):
        async with SimCluster(1, config=sim.make_config()) as c, aiohttp.ClientSession() as s:
            _, _, body = await sim.chat(s, c.urls[0], "same", max_tokens=6)
            texts.append((body["id"], body["choices"][0]["message"]["content"]))
    assert texts[0] == texts[1]


BAD_CHAT = [
    (b"{not json", 400),
    (b"[1, 2]", 400),
    (json.dumps({"model": "sim-model"}).encode(), 400),
    (json.dumps({"messages": "hi"}).encode(), 400),
    (json.dumps({"messages": []}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400),
    (json.dumps({"messages": [{"content": "no role"}]}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x"}],
                 "stream_options": {"include_usage": True}}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 40000}]}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "model": "nope"}).encode(), 404),
]


@pytest.mark.asyncio
async def test_bad_requests_get_vllm_errors(sim) -> None:
    async with SimCluster(1, config=sim.make_config()) as c, aiohttp.ClientSession() as s:
        for raw, code in BAD_CHAT:
            async with s.post(f"{c.urls[0]}/v1/chat/completions", data=raw,
                              headers={"Content-Type": "application/json"}) as r:
                assert r.status == code, raw
                err = (await r.json())["error"]
                assert set(err) == {"message", "type", "param", "code"}
                assert err["code"] == code and isinstance(err["message"], str)
                assert err["type"] == ("BadRequestError" if code == 400 else "NotFoundError")
        for body in ({"max_tokens": 3}, {"prompt": 7}, {"prompt": ["a", "b"]}, {"prompt": ""}):
            async with s.post(f"{c.urls[0]}/v1/completions", json=body) as r:
                assert r.status == 400, body
        # The server is still healthy and idle afterwards.
        st = await sim.state(s, c.urls[0])
        assert st["running"] == 0 and st["waiting"] == 0
