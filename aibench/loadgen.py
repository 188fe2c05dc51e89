"""Open-loop load: conversations start on schedule; each request streams and is timed.

Client-side timings per request: TTFT (first SSE chunk that carries generated text: the
role chunk and empty chunks do not count, as in vLLM's own streams), mean inter-token
latency (gap between text chunks divided by the tokens they carried), end-to-end latency.

A 200 whose stream ends properly (``[DONE]`` or a ``finish_reason``) without any text is
an *empty completion*: ok, its TTFT taken at the finishing chunk, its output tokens what
the server's usage reports (0 if none). A random-weight model asked for one token often
samples one that decodes to nothing. A 200 stream that stops without either is a failure
(``truncated``).

Which backend served a request is read from the response, from a signal the system under
test adds itself: ``x-aibench-upstream`` (Envoy's ``%UPSTREAM_HOST%``, added by the
bench's Envoy configs) or ``x-oracle-pick``; empty when the system says nothing (the
Rust routers: the harness counts their picks from their metrics instead).

Every run is bounded: no conversation starts after the workload's duration, and whatever
is still running ``grace_s`` later is cancelled and counted as a timeout.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from typing import Callable

from .stats import percentile, summarize  # noqa: F401 - re-exported
from .traffic import Workload

UPSTREAM_HEADER = "x-aibench-upstream"
SERVED_BY_HEADERS = (UPSTREAM_HEADER, "x-oracle-pick")


@dataclass
class Result:
    cid: int
    turn: int
    sent_s: float                  # relative to the run's start
    status: int | None = None
    error: str | None = None
    ttft_s: float | None = None
    itl_s: float | None = None     # mean inter-token latency
    e2e_s: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    served_by: str = ""
    empty: bool = False            # a 200 that generated no text
    scheduled_s: float | None = None  # replay: the arrival the recording asked for
    session: str | None = None
    ref: int | None = None         # replay: line/row in the file

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    def to_dict(self) -> dict:
        return asdict(self)


class Progress:
    """Counts for a progress line; the harness prints it."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.failed = 0


def _has_text(line: bytes) -> bool:
    return ((b'"content":"' in line and b'"content":""' not in line)
            or (b'"text":"' in line and b'"text":""' not in line))


async def one(session, url: str, path: str, body: dict, r: Result, timeout_s: float,
              headers: dict[str, str] | None = None) -> None:
    """Send one streamed request and fill ``r``."""
    import aiohttp

    t0 = time.perf_counter()
    first = last = finished = None
    gaps_tokens = 0
    done = False
    try:
        async with session.post(url + path, json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            r.status = resp.status
            r.served_by = next((resp.headers[h] for h in SERVED_BY_HEADERS if resp.headers.get(h)), "")
            if resp.status != 200:
                await resp.read()
                r.error = f"HTTP {resp.status}"
                return
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                if line.startswith(b"data: [DONE]"):
                    done = True
                    break
                if line.startswith(b'data: {"error"'):
                    r.error = "error in stream"
                    return
                if b'"usage":{' in line:
                    u = json.loads(line[6:]).get("usage") or {}
                    r.prompt_tokens = int(u.get("prompt_tokens") or 0)
                    r.output_tokens = int(u.get("completion_tokens") or 0)
                if _has_text(line):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        gaps_tokens += 1
                    last = now
                if finished is None and b'"finish_reason":"' in line:
                    finished = time.perf_counter()
    except asyncio.CancelledError:
        r.error = "timeout"
        raise
    except Exception as e:  # noqa: BLE001 - a failed request is data, not a crash
        r.error = type(e).__name__
        return
    finally:
        r.e2e_s = time.perf_counter() - t0 if r.error is None else None
    if not done and finished is None:
        r.error = "truncated"
        r.e2e_s = None
        return
    if first is not None:
        r.ttft_s = first - t0
        # Chunks may carry several tokens: spread the decode time over the generated tokens.
        n = r.output_tokens - 1 if r.output_tokens > 1 else gaps_tokens
        if n > 0 and last is not None and last > first:
            r.itl_s = (last - first) / n
    else:
        r.empty = True
        r.ttft_s = (finished - t0) if finished is not None else r.e2e_s


def prepare(body: dict, model: str) -> dict:
    body["model"] = model
    body["stream"] = True
    body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return body


async def run(url: str, workload: Workload, model: str = "sim-model", grace_s: float = 30.0,
              request_timeout_s: float = 120.0, progress: Progress | None = None,
              on_tick: Callable[[], None] | None = None, max_prompt_tokens: int | None = None,
              session_header: str | None = "x-session-id") -> tuple[list[Result], float]:
    """Drive ``workload`` at ``url``; returns the results and the run's wall time."""
    import aiohttp

    results: list[Result] = []
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    stop_at = t0 + workload.duration_s

    async def conversation(c) -> None:
        await asyncio.sleep(max(0.0, t0 + c.start_s - loop.time()))
        for k, turn in enumerate(c.turns):
            if turn.at_s is not None:  # replay: the recorded arrival, never before the previous answer
                await asyncio.sleep(max(0.0, t0 + turn.at_s - loop.time()))
            elif k:
                await asyncio.sleep(turn.think_s)
                if loop.time() > stop_at + grace_s / 2:
                    return
            path, body = c.request(k, max_prompt_tokens)
            r = Result(c.cid, k, loop.time() - t0, scheduled_s=turn.at_s, session=c.session, ref=turn.ref)
            results.append(r)
            hdrs = {session_header: c.session} if session_header and c.session is not None else None
            try:
                await one(session, url, path, prepare(body, model), r, request_timeout_s, hdrs)
            finally:
                if progress:
                    progress.done += 1
                    progress.failed += not r.ok
            if not r.ok and turn.at_s is None:
                return  # a chat does not go on after a failed turn (its history needs the answer)

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [loop.create_task(conversation(c)) for c in workload.conversations]
        ticker = None
        if on_tick is not None:
            async def tick() -> None:
                while True:
                    on_tick()
                    await asyncio.sleep(0.5)
            ticker = loop.create_task(tick())
        done, pending = await asyncio.wait(tasks, timeout=workload.duration_s + grace_s) if tasks else (set(), set())
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if ticker:
            ticker.cancel()
    return results, loop.time() - t0
