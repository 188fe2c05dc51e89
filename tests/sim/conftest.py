"""Shared helpers for the simulator tests.

Tests drive real servers over HTTP (aiohttp client) on ephemeral 127.0.0.1 ports, with a
small time-scale so simulated seconds pass fast; latency assertions use the simulated
times the server reports (``x-sim-*`` headers, /metrics), which do not depend on how
busy the machine is.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vllmsim import ServerConfig, load_profile

FIXTURES = Path("/work/shared/fixtures")
TIME_SCALE = 0.02  # 50x faster than real time


def make_config(time_scale: float = TIME_SCALE, model: str = "sim-model", **kw: Any) -> ServerConfig:
    """A ServerConfig on the default H100 profile; ``profile_overrides`` tweaks it."""
    overrides = kw.pop("profile_overrides", None)
    return ServerConfig(model=model, profile=load_profile("h100-8b", overrides),
                        time_scale=time_scale, seed=1, **kw)


async def chat(session: aiohttp.ClientSession, url: str, content: str, *, max_tokens: int = 8,
               stream: bool = False, model: str | None = None, timeout: float | None = None,
               **extra: Any) -> tuple[int, dict[str, str], Any]:
    """POST a one-message chat; returns (status, headers, parsed JSON or raw SSE text)."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": content}],
                            "max_tokens": max_tokens, "stream": stream, **extra}
    if model is not None:
        body["model"] = model
    to = aiohttp.ClientTimeout(total=timeout) if timeout else None
    async with session.post(f"{url}/v1/chat/completions", json=body, timeout=to) as r:
        text = await r.text()
        data: Any = text if stream and r.status == 200 else json.loads(text)
        return r.status, dict(r.headers), data


def parse_metrics(text: str) -> dict[str, Any]:
    """{sample name: value} for unlabeled lookups plus the raw families under '_families'."""
    fams = list(text_string_to_metric_families(text))
    out: dict[str, Any] = {"_families": fams}
    for fam in fams:
        for s in fam.samples:
            out.setdefault(s.name, s.value)
    return out


async def metrics(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/metrics") as r:
        assert r.status == 200
        return parse_metrics(await r.text())


async def state(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/sim/state") as r:
        return await r.json()


def sse_events(raw: str) -> list[Any]:
    """Decode an SSE body into JSON objects (and the literal '[DONE]')."""
    out: list[Any] = []
    for block in raw.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def words(n_tokens: int, tag: str = "") -> str:
    """A prompt of about ``n_tokens`` simulated tokens (4 chars each)."""
    base = (tag + "lorem ipsum dolor sit amet ") * (n_tokens // 6 + 2)
    return base[: n_tokens * 4]


@pytest.fixture
def sim() -> SimpleNamespace:
    """Helpers as a namespace so test modules need no import path tricks."""
    return SimpleNamespace(make_config=make_config, chat=chat, metrics=metrics, state=state,
                           parse_metrics=parse_metrics, sse_events=sse_events, words=words,
                           FIXTURES=FIXTURES, TIME_SCALE=TIME_SCALE)
