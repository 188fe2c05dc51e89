#!/usr/bin/env python3
"""How much CPU the simulator itself burns, and how many backends/streams one core carries.

The simulator runs in a child process (``python -m vllmsim serve``) so its CPU time can be
read from /proc/<pid>/stat independently of this load generator.  Everything binds to
127.0.0.1 and every load phase is bounded in time.

Measured:
1. CPU per 1,000 streamed tokens (one SSE chunk per token, and 8 tokens per chunk);
2. CPU per request (non-streaming, max_tokens=1: the fixed per-request overhead);
3. CPU per /metrics scrape;
4. capacity: real-time (time-scale 1.0) backends x streams, with every backend scraped
   every 100 ms, at increasing backend counts, until the simulator process nears one
   full core or falls behind the simulated GPU (engine "efficiency" < 0.9: the sum of
   simulated step time over elapsed simulated time of saturated engines).

Usage: python -m aibench.sim_cost [--quick] [--max-level-s 6]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from vllmsim.testing import SubprocessCluster, run_cluster_subprocess

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """User+system CPU seconds of a process (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def start(n: int, extra: list[str]) -> SubprocessCluster:
    return run_cluster_subprocess(n, base_port=0, args=["--seed", "1", *extra])


async def stream_worker(url: str, max_tokens: int, deadline: float, stats: dict[str, int],
                        stream: bool = True, tag: str = "") -> None:
    """Closed-loop client on one keep-alive connection.

    Raw asyncio streams instead of aiohttp's client: the load generator shares this
    2-core machine with the simulator and must cost less per token than the server.
    """
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    body = json.dumps({"messages": [{"role": "user", "content": f"bench {tag} hello there"}],
                       "max_tokens": max_tokens, "stream": stream}).encode()
    req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        stats["errors"] += 1
        return
    try:
        while time.monotonic() < deadline:
            writer.write(req)
            first = await reader.readuntil(b"\r\n\r\n")
            ok = first.startswith(b"HTTP/1.1 200")
            if b"chunked" in first.lower():
                tail = b""
                while not tail.endswith(b"\r\n0\r\n\r\n") and tail != b"0\r\n\r\n":
                    chunk = await reader.read(65536)
                    if not chunk:
                        raise ConnectionError("closed")
                    tail = (tail + chunk)[-16:]
            else:
                length = int(first.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
            if ok:
                stats["requests"] += 1
                stats["tokens"] += max_tokens
            else:
                stats["errors"] += 1
    except (OSError, asyncio.IncompleteReadError, ConnectionError):
        stats["errors"] += 1
    finally:
        writer.close()


async def scraper(session: aiohttp.ClientSession, urls: list[str], period: float,
                  deadline: float, stats: dict[str, int]) -> None:
    while time.monotonic() < deadline:
        t = time.monotonic()
        for url in urls:
            async with session.get(f"{url}/metrics") as r:
                await r.read()
            stats["scrapes"] += 1
        await asyncio.sleep(max(0.0, period - (time.monotonic() - t)))


async def engine_lag(session: aiohttp.ClientSession, admin_port: int) -> float:
    """Wall seconds the engines fell behind their step deadlines and gave up catching up."""
    async with session.get(f"http://127.0.0.1:{admin_port}/sim/servers") as r:
        states = await r.json()
    return sum(s["lag_dropped_wall_s"] for s in states)


async def measure(h: SubprocessCluster, *, concurrency: int, max_tokens: int, seconds: float,
                  stream: bool = True, scrape_period: float | None = None) -> dict[str, Any]:
    stats = {"requests": 0, "tokens": 0, "errors": 0, "scrapes": 0}
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as s:
        # Warm up connections, then measure a steady window.
        lag0 = await engine_lag(s, h.admin_port or 0)
        cpu0, wall0 = proc_cpu(h.proc.pid), time.monotonic()
        deadline = wall0 + seconds
        tasks = [stream_worker(h.urls[i % len(h.urls)], max_tokens, deadline, stats, stream,
                               tag=str(i)) for i in range(concurrency)]
        if scrape_period:
            tasks.append(scraper(s, h.urls, scrape_period, deadline, stats))
        await asyncio.wait_for(asyncio.gather(*tasks), seconds + 30)
        cpu1, wall1 = proc_cpu(h.proc.pid), time.monotonic()
        lag1 = await engine_lag(s, h.admin_port or 0)
    wall = wall1 - wall0
    n = len(h.ports)
    return {**stats, "cpu_s": cpu1 - cpu0, "wall_s": wall, "cpu_util": (cpu1 - cpu0) / wall,
            "tok_per_s": stats["tokens"] / wall, "lag_frac": (lag1 - lag0) / (n * wall)}


async def scrape_cost(h: SubprocessCluster, n: int) -> float:
    async with aiohttp.ClientSession() as s:
        cpu0 = proc_cpu(h.proc.pid)
        for _ in range(n):
            async with s.get(f"{h.urls[0]}/metrics") as r:
                await r.read()
        return (proc_cpu(h.proc.pid) - cpu0) / n


def line(msg: str) -> None:
    print(msg, flush=True)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    secs = min(args.max_level_s, 20.0)
    line(f"vllmsim bench (cores={os.cpu_count()}, level={secs:.0f}s, simulator in a child process)")

    # 1/2: per-token and per-request cost on one fast backend.
    for chunk in (1, 8):
        h = start(1, ["--time-scale", "0.05", "--stream-chunk-tokens", str(chunk)])
        try:
            r = await measure(h, concurrency=32, max_tokens=256, seconds=secs)
        finally:
            h.stop()
        us_per_token = r["cpu_s"] / max(r["tokens"], 1) * 1e6
        out[f"cpu_ms_per_1k_tokens_chunk{chunk}"] = us_per_token
        line(f"streaming, {chunk} token(s)/chunk: {r['tokens']} tokens in {r['wall_s']:.1f}s, "
             f"simulator CPU {r['cpu_s']:.2f}s ({r['cpu_util']:.0%} of a core) -> "
             f"{us_per_token:.1f} ms CPU per 1,000 tokens ({us_per_token:.1f} us/token)")
    h = start(1, ["--time-scale", "0.05"])
    try:
        r = await measure(h, concurrency=32, max_tokens=1, seconds=secs, stream=False)
        per_req = r["cpu_s"] / max(r["requests"], 1)
        out["cpu_ms_per_request"] = per_req * 1000
        line(f"non-streaming max_tokens=1: {r['requests']} requests -> "
             f"{per_req * 1e3:.3f} ms CPU per request")
        sc = await scrape_cost(h, 300)
        out["cpu_ms_per_scrape"] = sc * 1000
        line(f"/metrics scrape: {sc * 1e3:.3f} ms CPU per scrape")
    finally:
        h.stop()

    # 4: capacity sweep in real time (time-scale 1.0), 8 streams per backend, scraped at 10 Hz.
    levels = [1, 4, 8, 12, 16, 24, 32, 48, 64] if not args.quick else [1, 8, 32]
    out["capacity"] = {}
    for chunk in (1, 8):
        out["capacity"][chunk] = await capacity(levels, chunk, secs)
    return out


async def run_level(n: int, chunk: int, secs: float, per_backend: int) -> dict[str, Any]:
    h = start(n, ["--time-scale", "1.0", "--stream-chunk-tokens", str(chunk)])
    try:
        r = await measure(h, concurrency=n * per_backend, max_tokens=128, seconds=secs,
                          scrape_period=0.1)
    finally:
        h.stop()
    r["backends"], r["streams"] = n, n * per_backend
    return r


async def capacity(levels: list[int], chunk: int, secs: float, per_backend: int = 8
                   ) -> dict[str, Any]:
    """Real-time sweep; stops at the first level where the simulator is the bottleneck.

    Bottleneck = simulator CPU >= 90% of a core, or its engines dropped > 5% of wall time
    of step deadlines.  If instead the achieved token rate falls below 85% of
    backends x (rate of one backend) while the simulator is fine, the load generator is
    the limit and the sweep stops without a verdict on the simulator.
    """
    line(f"capacity (time-scale 1.0, {per_backend} streams/backend, max_tokens 128, "
         f"{chunk} token(s)/chunk, /metrics every 100 ms per backend):")
    rows = []
    last_ok: tuple[int, int] | None = None
    one_backend_rate = None
    verdict = "not reached"
    for n in levels:
        r = await run_level(n, chunk, secs, per_backend)
        if one_backend_rate is not None and (r["cpu_util"] >= 0.9 or r["lag_frac"] > 0.05
                                             or r["tok_per_s"] < 0.85 * one_backend_rate * n):
            # The machine is shared: retry once so a transient neighbour does not end the sweep.
            r2 = await run_level(n, chunk, secs, per_backend)
            r = max(r, r2, key=lambda x: x["tok_per_s"])
        rows.append(r)
        if one_backend_rate is None:
            one_backend_rate = r["tok_per_s"]
        expected = one_backend_rate * n
        sim_bound = r["cpu_util"] >= 0.9 or r["lag_frac"] > 0.05
        client_bound = not sim_bound and r["tok_per_s"] < 0.85 * expected
        note = ("  <- simulator is the bottleneck" if sim_bound
                else "  <- load generator is the bottleneck" if client_bound else "")
        line(f"  {n:3d} backends, {n * per_backend:4d} streams: {r['tok_per_s']:8.0f} tok/s "
             f"({r['tok_per_s'] / expected:4.0%} of simulated GPU rate), "
             f"{r['scrapes'] / r['wall_s']:5.0f} scrapes/s, simulator CPU {r['cpu_util']:4.0%}, "
             f"deadline lag {r['lag_frac']:.1%}{note}")
        if sim_bound:
            verdict = "simulator"
            break
        if client_bound:
            verdict = "load generator"
            break
        last_ok = (n, n * per_backend)
    projected = None
    if last_ok:
        line(f"  -> carried in real time: {last_ok[0]} backends / {last_ok[1]} concurrent streams "
             f"at {chunk} token(s)/chunk (sweep ended by: {verdict})")
        best = next(r for r in rows if r["backends"] == last_ok[0])
        per_backend_cpu = best["cpu_util"] / best["backends"]
        projected = int(0.9 / per_backend_cpu) if per_backend_cpu > 0 else None
        line(f"  -> simulator CPU per busy backend: {per_backend_cpu:.1%} of a core; on a "
             f"dedicated core (90% budget) that projects to ~{projected} backends / "
             f"~{(projected or 0) * per_backend} streams")
    return {"levels": rows, "max_ok": last_ok, "ended_by": verdict, "projected_backends": projected}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer capacity levels")
    p.add_argument("--max-level-s", type=float, default=6.0, help="seconds per level (max 20)")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args()
    res = asyncio.run(main_async(args))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
