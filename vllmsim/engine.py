"""One simulated vLLM engine: a continuous-batching scheduler over a paged KV cache.

Modelled on vLLM v1's scheduler because that is what decides queueing and cache hits:

* a step first schedules RUNNING requests (decodes need 1 token, partially prefilled
  prompts continue their chunk), then admits WAITING requests in FCFS order while there
  is token budget (``max_num_batched_tokens``), a free seat (``max_num_seqs``) and room
  in the KV cache.  A waiting request whose blocks cannot be allocated blocks the queue
  (head-of-line, like vLLM's FCFS policy);
* a running request that cannot get a block for its next token preempts the most recently
  admitted running request (recompute preemption: its blocks are freed and it goes back
  to the front of the queue, keeping its generated tokens);
* a request produces a token in every step after which all its tokens are computed.

Time: a step lasts ``profile.step_ms(...) * slowdown`` *simulated* milliseconds and
``time_scale`` times that in wall time.  All times the engine reports (metrics,
/sim/state) are simulated seconds derived from step boundaries, so they do not depend on
event-loop jitter.  The loop keeps a wall-clock deadline per step and catches up after an
oversleep, so throughput stays right even when the scaled step is below timer resolution.
The engine never busy-loops: it sleeps for each step and idles on an ``asyncio.Event``.
"""
from __future__ import annotations

import asyncio
import enum
import random
import time
from collections import deque
from typing import Any, Callable

from .kvcache import KVCache, block_hashes
from .metrics import EngineMetrics
from .profile import Profile

# If the loop falls behind its step deadlines by more than this (wall seconds), the
# debt is dropped: the process, not the simulated GPU, is then the bottleneck.
MAX_LAG_S = 0.05

ROLES = ("mixed", "prefill", "decode")


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class Request:
    """Engine-side state of one generation request."""

    __slots__ = (
        "id", "prompt_len", "hashes", "max_tokens", "target", "lora", "arrival", "arrival_wall",
        "num_computed", "num_output", "blocks", "num_cached_blocks", "status", "finish_reason",
        "first_scheduled", "first_token_time", "last_token_time", "finish_time",
        "num_preemptions", "cached_tokens", "computed_prompt_tokens", "event", "notify_every",
        "delivered", "prompt_counted",
    )

    def __init__(self, rid: str, prompt_len: int, hashes: list[int], max_tokens: int,
                 target: int, lora: str | None, arrival: float, arrival_wall: float,
                 notify_every: int = 1) -> None:
        self.id = rid
        self.prompt_len = prompt_len
        self.hashes = hashes
        self.max_tokens = max_tokens
        self.target = target
        self.lora = lora
        self.arrival = arrival
        self.arrival_wall = arrival_wall
        self.num_computed = 0
        self.num_output = 0
        self.blocks: list[int] = []
        self.num_cached_blocks = 0
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.first_scheduled: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finish_time: float | None = None
        self.num_preemptions = 0
        self.cached_tokens = 0
        self.computed_prompt_tokens = 0
        self.event = asyncio.Event()
        self.notify_every = max(1, notify_every)
        self.delivered = 0  # tokens already handed to the HTTP layer
        self.prompt_counted = False

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + self.num_output

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


class Engine:
    """Scheduler + step loop of one simulated server."""

    def __init__(self, profile: Profile, metrics: EngineMetrics, *, role: str = "mixed",
                 time_scale: float = 1.0, seed: int = 0,
                 slowdown: Callable[[], float] = lambda: 1.0) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.profile = profile
        self.metrics = metrics
        self.role = role
        self.time_scale = time_scale
        self.rng = random.Random(seed)
        self.slowdown = slowdown
        self.kv = KVCache(profile.num_gpu_blocks, profile.block_size, profile.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.steps = 0
        self.busy_sim_s = 0.0
        self._t0 = time.monotonic()
        self._next_wall = self._t0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._was_idle = True
        self._req_counter = 0
        self._last_preempted = False
        self.lag_dropped_s = 0.0  # wall seconds the loop fell behind and gave up catching up

    # ---------------------------------------------------------------- clock
    def now(self) -> float:
        """Current simulated time in seconds since the engine started."""
        return (time.monotonic() - self._t0) / self.time_scale

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="vllmsim-engine")

    async def stop(self) -> None:
        """Cancel the loop and abort everything (a crash loses all GPU state)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for req in list(self.waiting) + list(self.running):
            self.abort(req)

    # ------------------------------------------------------------- requests
    def new_request(self, prompt_len: int, token_ids: list[int] | None, max_tokens: int,
                    lora: str | None = None, notify_every: int = 1,
                    hashes: list[int] | None = None) -> Request:
        """Build a request; output length is drawn here so it is seed-deterministic."""
        if self.role == "prefill":
            max_tokens = 1
        target = self.profile.output_len.sample(self.rng, max_tokens)
        if hashes is None:
            hashes = block_hashes(token_ids or [], self.profile.block_size, lora)
        self._req_counter += 1
        wall = time.monotonic()
        return Request(f"{self._req_counter}", prompt_len, hashes, max_tokens, target, lora,
                       (wall - self._t0) / self.time_scale, wall, notify_every)

    def add(self, req: Request) -> None:
        self.waiting.append(req)
        self._wake.set()

    def abort(self, req: Request) -> None:
        """Drop a request (client went away or server crashed) and release its blocks."""
        if req.status is Status.FINISHED:
            return
        if req.status is Status.WAITING:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        else:
            try:
                self.running.remove(req)
            except ValueError:
                pass
        self.kv.free(req.blocks)
        req.blocks = []
        req.status = Status.FINISHED
        req.finish_reason = "abort"
        req.finish_time = self.now()
        self.metrics.success["abort"] += 1
        req.event.set()
        self._wake.set()

    def match_prefix_tokens(self, hashes: list[int], prompt_len: int) -> int:
        """How many prompt tokens would hit the prefix cache right now (an oracle)."""
        max_blocks = min(len(hashes), (prompt_len - 1) // self.kv.block_size)
        return len(self.kv.match_prefix(hashes, max_blocks)) * self.kv.block_size

    # ------------------------------------------------------------ scheduler
    def _schedule(self) -> tuple[list[tuple[Request, int]], int, int, int, float, list[Request]]:
        """Pick this step's work.

        Returns (items, prefill_tokens, decode_seqs, context_tokens, latest arrival (wall)
        among newly admitted requests, newly admitted requests).
        """
        prof = self.profile
        kv = self.kv
        bs = kv.block_size
        budget = prof.max_num_batched_tokens
        items: list[tuple[Request, int]] = []
        preempted = False
        latest_arrival = 0.0
        admitted: list[Request] = []
        running = self.running

        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            if n <= 0:
                i += 1
                continue
            need = req.num_computed + n
            ok = need <= len(req.blocks) * bs or kv.allocate(req.blocks, need)
            while not ok:
                victim = running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
                ok = kv.allocate(req.blocks, req.num_computed + n)
            if not ok:
                break
            items.append((req, n))
            budget -= n
            i += 1

        if not preempted and self.waiting:
            lora_on = any(r.lora for r in running) or any(r.lora for r in self.waiting)
            active_loras = {r.lora for r in running if r.lora} if lora_on else set()
            skipped: list[Request] = []
            while self.waiting and budget > 0 and len(running) < prof.max_num_seqs:
                req = self.waiting[0]
                if req.lora and req.lora not in active_loras and len(active_loras) >= prof.max_loras:
                    skipped.append(self.waiting.popleft())
                    continue
                hit_blocks: list[int] = []
                hit_tokens = req.num_computed  # 0 unless something odd
                if req.num_computed == 0:
                    max_blocks = min(len(req.hashes), (req.num_tokens - 1) // bs)
                    hit_blocks = kv.match_prefix(req.hashes, max_blocks)
                    hit_tokens = len(hit_blocks) * bs
                if self.role == "decode" and req.num_output == 0:
                    # KV arrives from the prefill instance: no prefill compute, only blocks.
                    start_at = max(hit_tokens, req.num_tokens - 1)
                    n = 1
                else:
                    start_at = hit_tokens
                    n = req.num_tokens - hit_tokens
                    if not prof.enable_chunked_prefill and n > budget:
                        break
                    n = min(n, budget)
                if not kv.allocate(req.blocks, start_at + n, hit_blocks):
                    break
                self.waiting.popleft()
                req.status = Status.RUNNING
                req.num_computed = start_at
                req.num_cached_blocks = len(hit_blocks)
                if self.role == "decode":
                    self._publish_blocks(req)
                m = self.metrics
                m.prefix_queries += req.num_tokens
                m.prefix_hits += hit_tokens
                if req.first_scheduled is None:
                    req.cached_tokens = hit_tokens
                    admitted.append(req)
                if req.lora:
                    active_loras.add(req.lora)
                running.append(req)
                items.append((req, n))
                budget -= n
                if req.arrival_wall > latest_arrival:
                    latest_arrival = req.arrival_wall
            if skipped:
                self.waiting.extendleft(reversed(skipped))
        self._last_preempted = preempted

        prefill_tokens = decode_seqs = ctx = 0
        for req, n in items:
            if n == 1 and req.num_computed >= req.prompt_len - 1 and (
                    req.num_output > 0 or self.role == "decode"):
                decode_seqs += 1
                ctx += req.num_computed
            else:
                prefill_tokens += n
        return items, prefill_tokens, decode_seqs, ctx, latest_arrival, admitted

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.blocks)
        req.blocks = []
        req.num_computed = 0
        req.num_cached_blocks = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.metrics.preemptions += 1
        self.waiting.appendleft(req)

    def _publish_blocks(self, req: Request) -> None:
        full = min(req.num_computed, req.prompt_len) // self.kv.block_size
        if full > req.num_cached_blocks:
            self.kv.cache_blocks(req.blocks, req.hashes, req.num_cached_blocks, full)
            req.num_cached_blocks = full

    # --------------------------------------------------------------- step
    def _apply(self, items: list[tuple[Request, int]], t: float) -> None:
        """Advance the scheduled requests to the end of a step at simulated time ``t``."""
        m = self.metrics
        any_finished = False
        for req, n in items:
            if req.status is not Status.RUNNING:
                continue  # aborted during the step
            req.num_computed += n
            if req.num_cached_blocks < len(req.hashes):
                self._publish_blocks(req)
            if req.num_computed < req.num_tokens:
                continue  # mid-prefill chunk
            req.num_output += 1
            m.generation_tokens += 1
            if req.first_token_time is None:
                req.first_token_time = t
                m.observe("time_to_first_token_seconds", t - req.arrival)
                computed = req.prompt_len - req.cached_tokens
                req.computed_prompt_tokens = computed
                m.prompt_tokens += req.prompt_len
                m.prompt_computed += computed
                m.prompt_cached += req.cached_tokens
            else:
                m.observe("inter_token_latency_seconds", t - (req.last_token_time or t))
            req.last_token_time = t
            if req.num_output >= req.target:
                self._finish(req, "length" if req.target >= req.max_tokens else "stop", t)
                any_finished = True
            elif req.num_output == 1 or req.num_output - req.delivered >= req.notify_every:
                req.event.set()
        if any_finished:
            self.running = [r for r in self.running if r.status is Status.RUNNING]

    def _finish(self, req: Request, reason: str, t: float) -> None:
        m = self.metrics
        self.kv.free(req.blocks)
        req.blocks = []
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.finish_time = t
        m.success[reason] += 1
        m.num_requests += 1
        first = req.first_token_time if req.first_token_time is not None else t
        sched = req.first_scheduled if req.first_scheduled is not None else req.arrival
        m.observe("e2e_request_latency_seconds", t - req.arrival)
        m.observe("request_inference_time_seconds", t - sched)
        m.observe("request_prefill_time_seconds", first - sched)
        m.observe("request_decode_time_seconds", t - first)
        if req.num_output > 1:
            m.observe("request_time_per_output_token_seconds", (t - first) / (req.num_output - 1))
        m.observe("request_prompt_tokens", req.prompt_len)
        m.observe("request_generation_tokens", req.num_output)
        m.observe("request_max_num_generation_tokens", req.max_tokens)
        m.observe("request_params_max_tokens", req.max_tokens)
        m.observe("request_params_n", 1)
        m.observe("request_num_preemptions", req.num_preemptions)
        m.observe("request_prefill_kv_computed_tokens", req.computed_prompt_tokens)
        req.event.set()

    async def _run(self) -> None:
        mono = time.monotonic
        scale = self.time_scale
        while True:
            if not self.waiting and not self.running:
                self._was_idle = True
                self._wake.clear()
                await self._wake.wait()
                continue
            items, prefill, decode, ctx, latest_arrival, admitted = self._schedule()
            if not items and self._last_preempted:
                await asyncio.sleep(0)
                continue  # everything was preempted: admit from the queue next round
            if not items:
                # Nothing can run (e.g. LoRA budget); wait for a finish/abort/arrival.
                self._was_idle = True
                self._wake.clear()
                await self._wake.wait()
                continue
            step_s = self.profile.step_ms(prefill, decode, ctx) / 1000.0 * max(self.slowdown(), 0.0)
            now = mono()
            if self._was_idle:
                # React as if instantly to the arrival that woke us, so the wake-up
                # latency of the event loop does not leak into simulated times.
                start = latest_arrival or now
            else:
                start = max(self._next_wall, latest_arrival)
            if now - start > MAX_LAG_S:
                self.lag_dropped_s += now - start
                start = now
            self._was_idle = False
            end = start + step_s * scale
            self._next_wall = end
            if admitted:
                t_start = (start - self._t0) / scale
                for req in admitted:
                    req.first_scheduled = t_start
                    self.metrics.observe("request_queue_time_seconds",
                                         max(0.0, t_start - req.arrival))
            delay = end - mono()
            await asyncio.sleep(delay if delay > 0 else 0)
            self.steps += 1
            self.busy_sim_s += step_s
            self.metrics.observe("iteration_tokens_total", float(sum(n for _, n in items)))
            self._apply(items, (end - self._t0) / scale)

    # -------------------------------------------------------------- state
    def running_loras(self) -> list[str]:
        return sorted({r.lora for r in self.running if r.lora})

    def waiting_loras(self) -> list[str]:
        return sorted({r.lora for r in self.waiting if r.lora})

    def state(self) -> dict[str, Any]:
        m = self.metrics
        kv = self.kv
        return {
            "role": self.role,
            "running": len(self.running),
            "waiting": len(self.waiting),
            "kv_cache_usage": kv.usage(),
            "num_gpu_blocks": kv.num_blocks,
            "block_size": kv.block_size,
            "free_blocks": kv.num_free,
            "cached_blocks": len(kv.cached),
            "evicted_blocks": kv.evictions,
            "prefix_cache_queries": m.prefix_queries,
            "prefix_cache_hits": m.prefix_hits,
            "prompt_tokens": m.prompt_tokens,
            "generation_tokens": m.generation_tokens,
            "num_preemptions": m.preemptions,
            "requests_finished": dict(m.success),
            "running_loras": self.running_loras(),
            "waiting_loras": self.waiting_loras(),
            "steps": self.steps,
            "busy_sim_s": self.busy_sim_s,
            "lag_dropped_wall_s": self.lag_dropped_s,
            "sim_time_s": self.now(),
            "time_scale": self.time_scale,
        }
