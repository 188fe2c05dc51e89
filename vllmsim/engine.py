"""One simulated vLLM engine: the step loop around the scheduler (scheduler.py).

Time: a step lasts ``profile.step_ms(...) * slowdown`` *simulated* milliseconds and
``time_scale`` times that in wall time.  All times the engine reports (metrics,
/sim/state) are simulated seconds derived from step boundaries, so they do not depend on
event-loop jitter.  The loop keeps a wall-clock deadline per step and catches up after an
oversleep, so throughput stays right even when the scaled step is below timer resolution.
The engine never busy-loops: it sleeps for each step and idles on an ``asyncio.Event``.

After every step the KV events the step caused (block stored / removed, cache cleared)
go out as one batch to the ``publish`` callback, as vLLM's engine core does.
"""
from __future__ import annotations

import asyncio
import random
import time
from typing import Any, Callable

from .kvcache import KVCache, block_hashes
from .metrics import EngineMetrics
from .pd import DEFAULT_ABORT_TIMEOUT_S, HeldBlocks
from .profile import Profile
from .request import Request
from .scheduler import Scheduler

# If the loop falls behind its step deadlines by more than this (wall seconds), the
# debt is dropped: the process, not the simulated GPU, is then the bottleneck.
MAX_LAG_S = 0.05

ROLES = ("mixed", "prefill", "decode")


class Engine:
    """Scheduler + step loop + KV holds of one simulated server."""

    def __init__(self, profile: Profile, metrics: EngineMetrics, *, role: str = "mixed",
                 time_scale: float = 1.0, seed: int = 0,
                 slowdown: Callable[[], float] = lambda: 1.0,
                 publish: Callable[[list[dict[str, Any]]], None] | None = None,
                 abort_timeout_s: float = DEFAULT_ABORT_TIMEOUT_S) -> None:
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
        self.publish = publish
        self._t0 = time.monotonic()
        self._wake = asyncio.Event()
        self.kv = KVCache(profile.num_gpu_blocks, profile.block_size, profile.enable_prefix_caching,
                          record_events=publish is not None)
        self.holds = HeldBlocks(self.kv, self.now, abort_timeout_s, on_free=self._wake.set)
        self.sched = Scheduler(profile, metrics, self.kv, on_hold=self.holds.hold)
        self.steps = 0
        self.busy_sim_s = 0.0
        self._next_wall = self._t0
        self._task: asyncio.Task[None] | None = None
        self._was_idle = True
        self._req_counter = 0
        self.lag_dropped_s = 0.0  # wall seconds the loop fell behind and gave up catching up

    @property
    def waiting(self) -> Any:
        return self.sched.waiting

    @property
    def running(self) -> list[Request]:
        return self.sched.running

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
        s = self.sched
        for req in list(s.waiting) + list(s.running) + list(s.transferring):
            self.abort(req)

    # ------------------------------------------------------------- requests
    def new_request(self, token_ids: list[int], max_tokens: int, lora: str | None = None,
                    notify_every: int = 1, hashes: list[int] | None = None,
                    lora_id: int | None = None) -> Request:
        """Build a request; output length is drawn here so it is seed-deterministic."""
        target = self.profile.output_len.sample(self.rng, max_tokens)
        if hashes is None:
            hashes = block_hashes(token_ids, self.profile.block_size, lora)
        self._req_counter += 1
        wall = time.monotonic()
        return Request(f"{self._req_counter}", token_ids, hashes, max_tokens, target, lora,
                       (wall - self._t0) / self.time_scale, wall, notify_every, lora_id)

    def add(self, req: Request) -> None:
        """Queue ``req``; it arrives now (time spent reading remote KV metadata is wall time)."""
        req.arrival_wall = time.monotonic()
        req.arrival = (req.arrival_wall - self._t0) / self.time_scale
        self.sched.waiting.append(req)
        self._wake.set()

    def abort(self, req: Request) -> None:
        self.sched.abort(req, self.now())
        self._wake.set()

    def match_prefix_tokens(self, hashes: list[int], prompt_len: int) -> int:
        return self.sched.match_prefix_tokens(hashes, prompt_len)

    # --------------------------------------------------------------- loop
    async def _idle(self) -> None:
        """Sleep until woken, or until the next KV transfer or hold expiry is due."""
        self._was_idle = True
        self._wake.clear()
        due = min((t for t in (self.sched.next_transfer_done(), self.holds.next_expiry())
                   if t is not None), default=None)
        if due is None:
            await self._wake.wait()
            return
        try:
            await asyncio.wait_for(self._wake.wait(), max(0.0, (due - self.now()) * self.time_scale))
        except asyncio.TimeoutError:
            pass

    async def _run(self) -> None:
        mono = time.monotonic
        scale = self.time_scale
        s = self.sched
        while True:
            self.holds.expire()
            if not s.waiting and not s.running and not s.transferring:
                self._flush_events()
                await self._idle()
                continue
            plan = s.schedule(self.now())
            if not plan.items:
                self._flush_events()
                if plan.preempted:
                    await asyncio.sleep(0)
                    continue  # everything was preempted: admit from the queue next round
                # Nothing can run (LoRA budget, KV transfers): wait for an event.
                await self._idle()
                continue
            step_s = self.profile.step_ms(plan.prefill_tokens, plan.decode_seqs,
                                          plan.context_tokens) / 1000.0 * max(self.slowdown(), 0.0)
            now = mono()
            # After idling, react as if instantly to the arrival that woke us, so the
            # wake-up latency of the event loop does not leak into simulated times.
            # A KV transfer that completed while idle counts as an arrival at its end.
            arrival = max(plan.latest_arrival_wall, self._t0 + s.last_ready * scale if s.last_ready else 0.0)
            start = (arrival or now) if self._was_idle else max(self._next_wall, arrival)
            if now - start > MAX_LAG_S:
                self.lag_dropped_s += now - start
                start = now
            self._was_idle = False
            end = start + step_s * scale
            self._next_wall = end
            t_start = (start - self._t0) / scale
            for req in plan.admitted:
                req.first_scheduled = t_start
                self.metrics.observe("request_queue_time_seconds", max(0.0, t_start - req.arrival))
            delay = end - mono()
            await asyncio.sleep(delay if delay > 0 else 0)
            self.steps += 1
            self.busy_sim_s += step_s
            self.metrics.observe("iteration_tokens_total", float(sum(n for _, n in plan.items)))
            s.apply(plan.items, (end - self._t0) / scale)
            self._flush_events()

    def _flush_events(self) -> None:
        if self.publish is not None:
            events = self.kv.take_events()
            if events:
                self.publish(events)

    # -------------------------------------------------------------- state
    def running_loras(self) -> list[str]:
        return sorted({r.lora for r in self.sched.running if r.lora})

    def waiting_loras(self) -> list[str]:
        return sorted({r.lora for r in self.sched.waiting if r.lora})

    def state(self) -> dict[str, Any]:
        self.holds.expire()
        m, kv, s = self.metrics, self.kv, self.sched
        return {
            "role": self.role, "running": len(s.running),
            "waiting": len(s.waiting) + len(s.transferring),
            "waiting_for_kv_transfer": len(s.transferring),
            "kv_cache_usage": kv.usage(), "num_gpu_blocks": kv.num_blocks,
            "block_size": kv.block_size, "free_blocks": kv.num_free,
            "cached_blocks": len(kv.cached), "evicted_blocks": kv.evictions,
            "held_blocks": self.holds.num_blocks(),
            "kv_transfers": self.holds.stats(),
            "prefix_cache_queries": m.prefix_queries, "prefix_cache_hits": m.prefix_hits,
            "prompt_tokens": m.prompt_tokens,
            "prompt_tokens_by_source": {"local_compute": m.prompt_computed,
                                        "local_cache_hit": m.prompt_local_hit,
                                        "external_kv_transfer": m.prompt_external},
            "generation_tokens": m.generation_tokens, "num_preemptions": m.preemptions,
            "requests_finished": dict(m.success),
            "running_loras": self.running_loras(), "waiting_loras": self.waiting_loras(),
            "steps": self.steps, "busy_sim_s": self.busy_sim_s,
            "lag_dropped_wall_s": self.lag_dropped_s, "sim_time_s": self.now(),
            "time_scale": self.time_scale,
        }
