"""Open-loop load: conversations start on schedule; each request streams and is timed.

Client-side timings per request: TTFT (first SSE chunk that carries generated text: the
role chunk and empty chunks do not count, as in vLLM's own streams), mean inter-token
latency (gap between text chunks divided by the tokens they carried), end-to-end latency.
Every run is bounded: no conversation starts after the workload's duration, and whatever
is still running ``grace_s`` later is cancelled and counted as a timeout.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from typing import Callable

from .workloads import Workload

CHAT = "/v1/chat/completions"


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


async def one(session, url: str, model: str, messages: list[dict], max_tokens: int, r: Result,
              timeout_s: float) -> None:
    import aiohttp

    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    gaps_tokens = 0
    try:
        async with session.post(url + CHAT, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            r.status = resp.status
            r.served_by = resp.headers.get("x-sim-server", "")
            if resp.status != 200:
                await resp.read()
                r.error = f"HTTP {resp.status}"
                return
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                if line.startswith(b"data: [DONE]"):
                    break
                if b'"usage"' in line and b'"choices":[]' in line:
                    u = json.loads(line[6:]).get("usage") or {}
                    r.prompt_tokens = int(u.get("prompt_tokens", 0))
                    r.output_tokens = int(u.get("completion_tokens", 0))
                    continue
                if b'"content":"' in line and b'"content":""' not in line:
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        gaps_tokens += 1
                    last = now
    except asyncio.CancelledError:
        r.error = "timeout"
        raise
    except Exception as e:  # noqa: BLE001 - a failed request is data, not a crash
        r.error = type(e).__name__
        return
    finally:
        r.e2e_s = time.perf_counter() - t0 if r.error is None else None
    if first is not None:
        r.ttft_s = first - t0
        # Chunks may carry several tokens: spread the decode time over the generated tokens.
        n = r.output_tokens - 1 if r.output_tokens > 1 else gaps_tokens
        if n > 0 and last is not None and last > first:
            r.itl_s = (last - first) / n
    else:
        r.error = r.error or "no tokens"


async def run(url: str, workload: Workload, model: str = "sim-model", grace_s: float = 30.0,
              request_timeout_s: float = 120.0, progress: Progress | None = None,
              on_tick: Callable[[], None] | None = None) -> tuple[list[Result], float]:
    """Drive ``workload`` at ``url``; returns the results and the run's wall time."""
    import aiohttp

    results: list[Result] = []
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    stop_at = t0 + workload.duration_s

    async def conversation(c) -> None:
        await asyncio.sleep(max(0.0, t0 + c.start_s - loop.time()))
        for k, turn in enumerate(c.turns):
            if k:
                await asyncio.sleep(turn.think_s)
                if loop.time() > stop_at + grace_s / 2:
                    return
            r = Result(c.cid, k, loop.time() - t0)
            results.append(r)
            try:
                await one(session, url, model, c.messages(k), turn.max_tokens, r, request_timeout_s)
            finally:
                if progress:
                    progress.done += 1
                    progress.failed += not r.ok
            if not r.ok:
                return  # a conversation does not go on after a failed turn

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


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list, else None."""
    if not xs:
        return None
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(results: list[Result], wall_s: float) -> dict:
    ok = [r for r in results if r.ok]
    out: dict = {"requests": len(results), "ok": len(ok), "failed": len(results) - len(ok),
                 "errors": {}, "wall_s": wall_s,
                 "throughput_rps": len(ok) / wall_s if wall_s > 0 else 0.0,
                 "output_tokens_per_s": sum(r.output_tokens for r in ok) / wall_s if wall_s > 0 else 0.0}
    for r in results:
        if not r.ok:
            k = r.error or f"HTTP {r.status}"
            out["errors"][k] = out["errors"].get(k, 0) + 1
    for name, vals in (("ttft", [r.ttft_s for r in ok if r.ttft_s is not None]),
                       ("itl", [r.itl_s for r in ok if r.itl_s is not None]),
                       ("e2e", [r.e2e_s for r in ok if r.e2e_s is not None])):
        for q in (50, 90, 99):
            out[f"{name}_p{q}_s"] = percentile(vals, q)
        out[f"{name}_mean_s"] = sum(vals) / len(vals) if vals else None
    served: dict[str, int] = {}
    for r in ok:
        served[r.served_by] = served.get(r.served_by, 0) + 1
    out["served_by"] = served
    return out
