"""The demo's "why" phase: multi-turn conversations with shared prefixes.

Several groups of users, each group with its own long system prompt, hold conversations
of a few turns whose history grows. ai-lb's ``prefix_cache`` policy sends a conversation
(and its group) to the backend that already holds its prefix; Envoy's round robin spreads
every turn over all backends, so each backend prefills the same long prompts again. The
same conversations run twice on the same simulators (their prefix caches reset in
between): once through ai-lb, once on ``/native/`` (Envoy's round robin). Printed: the
backends' own prefix-cache hit rate (``vllm:prefix_cache_hits_total`` /
``vllm:prefix_cache_queries_total``) and the client's time to first token.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

from . import devstack as ds
from .demo_stack import MODEL, SIM_KV_BLOCKS, Stack, metric, step, wait_until
from .workloads import text

CHAT = "/v1/chat/completions"
GROUPS = 4              # distinct long system prompts
CONVERSATIONS = 3       # per group, all at once
TURNS = 4               # per conversation, one after the other
SYSTEM_TOKENS = 6000    # ~24 KB of system prompt per group
USER_TOKENS = 60
MAX_TOKENS = 24
TIMEOUT_S = 20.0        # bounds one run


@dataclass
class Run:
    label: str
    ttft_s: list[float] = field(default_factory=list)
    failed: int = 0         # turns not answered
    hits: float = 0.0
    queries: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def pct(self, q: float) -> float:
        xs = sorted(self.ttft_s)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def conversations(seed: int = 7) -> list[tuple[str, list[str]]]:
    """(system prompt, user turns) per conversation; the same for both runs."""
    rng = random.Random(seed)
    systems = [f"You are assistant #{g} of the ai-lb demo. " + text(rng, SYSTEM_TOKENS) for g in range(GROUPS)]
    return [(systems[g], [f"[user {g}.{c} turn {t}] " + text(rng, USER_TOKENS) for t in range(TURNS)])
            for g in range(GROUPS) for c in range(CONVERSATIONS)]


async def _turn(session: Any, url: str, messages: list[dict], run: Run) -> str:
    import aiohttp

    body = {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS, "stream": True}
    t0 = time.perf_counter()
    answer, first = [], None
    async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}")
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            delta = json.loads(line[6:])["choices"][0].get("delta", {}).get("content")
            if delta:
                if first is None:
                    first = time.perf_counter() - t0
                answer.append(delta)
    if first is None:
        raise RuntimeError("no token streamed")
    run.ttft_s.append(first)
    return "".join(answer)


async def _conversation(session: Any, url: str, system: str, turns: list[str], run: Run, delay: float) -> None:
    await asyncio.sleep(delay)
    messages = [{"role": "system", "content": system}]
    for user in turns:
        messages.append({"role": "user", "content": user})
        try:
            answer = await _turn(session, url, messages, run)
        except Exception:  # noqa: BLE001 - counted (as unanswered turns); the conversation ends here
            return
        messages.append({"role": "assistant", "content": answer})


async def _run(url: str, run: Run) -> None:
    import aiohttp

    convs = conversations()
    async with aiohttp.ClientSession() as s:
        tasks = [asyncio.create_task(_conversation(s, url, sysp, turns, run, 0.01 * i))
                 for i, (sysp, turns) in enumerate(convs)]
        done, pending = await asyncio.wait(tasks, timeout=TIMEOUT_S)
        for t in pending:
            t.cancel()
    run.failed = len(convs) * TURNS - len(run.ttft_s)  # every turn not answered


def _prefix_counters(st: Stack) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    hits = queries = 0.0
    for port in st.backend_ports:
        _, body = ds.http_get(f"http://127.0.0.1:{port}/metrics", timeout=2)
        for fam in text_string_to_metric_families(body):
            for smp in fam.samples:
                if smp.name == "vllm:prefix_cache_hits_total":
                    hits += smp.value
                elif smp.name == "vllm:prefix_cache_queries_total":
                    queries += smp.value
    return hits, queries


def _reset_caches(st: Stack) -> None:
    import urllib.request

    for port in st.backend_ports:
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/reset_prefix_cache", data=b"",
                                                      method="POST"), timeout=2).read()


def measure(st: Stack, label: str, path: str) -> Run:
    _reset_caches(st)
    h0, q0 = _prefix_counters(st)
    run = Run(label)
    asyncio.run(_run(st.url + path, run))
    h1, q1 = _prefix_counters(st)
    run.hits, run.queries = h1 - h0, q1 - q0
    return run


def phase_prefix(st: Stack) -> list[Run]:
    n = GROUPS * CONVERSATIONS
    step(f"phase 3: why ai-lb: {n} conversations ({GROUPS} groups sharing a ~{SYSTEM_TOKENS}-token system "
         f"prompt, {TURNS} turns each), first through ai-lb's prefix_cache, then Envoy's round robin")
    applied = metric(st, "ai_lb_config_reloads_total", result="applied")
    st.write_config("prefix_cache")
    wait_until(lambda: metric(st, "ai_lb_config_reloads_total", result="applied") > applied, 10,
               "ai-lb did not reload its config")
    runs = [measure(st, "ai-lb prefix_cache", CHAT), measure(st, "Envoy round robin", "/native" + CHAT)]
    print(f"    same simulators (KV cache {SIM_KV_BLOCKS * 16 // 1000}k tokens each), prefix caches reset before each run:")
    print(f"    {'':<20s} {'prefix-cache hit rate':>22s} {'TTFT p50':>9s} {'TTFT p90':>9s} {'failed':>7s}")
    for r in runs:
        print(f"    {r.label:<20s} {r.hit_rate * 100:21.0f}% {r.pct(0.5) * 1000:6.0f} ms {r.pct(0.9) * 1000:6.0f} ms "
              f"{r.failed:7d}")
    ai, rr = runs
    if rr.pct(0.5) > 0:
        print(f"    prefix_cache: {ai.hit_rate * 100:.0f}% of prompt tokens served from cache against "
              f"{rr.hit_rate * 100:.0f}%, TTFT p50 {rr.pct(0.5) / max(ai.pct(0.5), 1e-9):.1f}x lower")
    return runs
