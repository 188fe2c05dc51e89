"""vLLM v1's FCFS scheduler over the paged KV cache (no clock, no I/O: see engine.py).

* a step first schedules RUNNING requests (decodes need 1 token, partially prefilled
  prompts continue their chunk), then admits WAITING requests in FCFS order while there
  is token budget (``max_num_batched_tokens``), a free seat (``max_num_seqs``) and room
  in the KV cache.  A waiting request whose blocks cannot be allocated blocks the queue
  (head-of-line, like vLLM's FCFS policy);
* a running request that cannot get a block for its next token preempts the most recently
  admitted running request (recompute preemption: its blocks are freed and it goes back
  to the front of the queue, keeping its generated tokens);
* a request whose prompt KV comes from a prefill server (``remote_prefill``) gets blocks
  for the whole prompt on admission, waits ``kv_transfer_per_token_ms`` per transferred
  token without using the token budget (vLLM's WAITING_FOR_REMOTE_KVS), then computes
  only the last prompt token;
* a request produces a token in every step after which all its tokens are computed.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, NamedTuple

from .accounting import record_finish, record_prompt
from .kvcache import KVCache
from .metrics import EngineMetrics
from .profile import Profile
from .request import Request, Status


class Plan(NamedTuple):
    items: list[tuple[Request, int]]
    prefill_tokens: int
    decode_seqs: int
    context_tokens: int
    latest_arrival_wall: float
    admitted: list[Request]
    preempted: bool


def _batch_shape(items: list[tuple[Request, int]]) -> tuple[int, int, int]:
    """(prefill tokens, decode sequences, their context tokens) of a step's items."""
    prefill_tokens = decode_seqs = ctx = 0
    for req, n in items:
        if n == 1 and req.num_computed >= req.prompt_len - 1 and (req.num_output > 0 or req.remote_prefill):
            decode_seqs += 1
            ctx += req.num_computed
        else:
            prefill_tokens += n
    return prefill_tokens, decode_seqs, ctx


class Scheduler:
    def __init__(self, profile: Profile, metrics: EngineMetrics, kv: KVCache,
                 on_hold: Callable[[Request], None] = lambda r: None) -> None:
        self.profile = profile
        self.metrics = metrics
        self.kv = kv
        self.on_hold = on_hold  # a finished prefill-for-remote-decode keeps its blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.transferring: list[Request] = []  # allocated, waiting for remote KV
        self.last_ready = 0.0  # simulated time the latest finished transfer completed

    def match_prefix_tokens(self, hashes: list[int], prompt_len: int) -> int:
        """How many prompt tokens would hit the prefix cache right now (an oracle)."""
        max_blocks = min(len(hashes), (prompt_len - 1) // self.kv.block_size)
        return len(self.kv.match_prefix(hashes, max_blocks)) * self.kv.block_size

    # ------------------------------------------------------------ scheduling
    def schedule(self, now: float) -> Plan:
        """Pick this step's work (``now``: simulated time at the step's start)."""
        prof, kv, running = self.profile, self.kv, self.running
        bs, budget = kv.block_size, prof.max_num_batched_tokens
        items: list[tuple[Request, int]] = []
        admitted: list[Request] = []
        preempted, latest_arrival = False, 0.0
        if self.transferring:
            self._finish_transfers(now)

        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            if n <= 0:
                i += 1
                continue
            ok = req.num_computed + n <= len(req.blocks) * bs or kv.allocate(req.blocks, req.num_computed + n)
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
            while (self.waiting and budget > 0
                   and len(running) + len(self.transferring) < prof.max_num_seqs):
                req = self.waiting[0]
                if req.lora and req.lora not in active_loras and len(active_loras) >= prof.max_loras:
                    skipped.append(self.waiting.popleft())
                    continue
                hit_blocks: list[int] = []
                if req.num_computed == 0:
                    max_blocks = min(len(req.hashes), (req.num_tokens - 1) // bs)
                    hit_blocks = kv.match_prefix(req.hashes, max_blocks)
                hit_tokens = len(hit_blocks) * bs
                if req.remote_prefill:
                    # Blocks for the whole prompt now; the KV arrives after the transfer.
                    if not kv.allocate(req.blocks, req.prompt_len, hit_blocks):
                        break
                    self.waiting.popleft()
                    self._count_admission(req, hit_blocks, hit_tokens, admitted)
                    req.external_tokens = req.prompt_len - hit_tokens
                    req.kv_ready_at = now + req.external_tokens * prof.kv_transfer_per_token_ms / 1000.0
                    self.transferring.append(req)
                    continue
                n = req.num_tokens - hit_tokens
                if not prof.enable_chunked_prefill and n > budget:
                    break
                n = min(n, budget)
                if not kv.allocate(req.blocks, hit_tokens + n, hit_blocks):
                    break
                self.waiting.popleft()
                req.status = Status.RUNNING
                req.num_computed = hit_tokens
                self._count_admission(req, hit_blocks, hit_tokens, admitted)
                if req.lora:
                    active_loras.add(req.lora)
                running.append(req)
                items.append((req, n))
                budget -= n
                if req.arrival_wall > latest_arrival:
                    latest_arrival = req.arrival_wall
            if skipped:
                self.waiting.extendleft(reversed(skipped))

        return Plan(items, *_batch_shape(items), latest_arrival, admitted, preempted)

    def _count_admission(self, req: Request, hit_blocks: list[int], hit_tokens: int,
                         admitted: list[Request]) -> None:
        req.num_cached_blocks = len(hit_blocks)
        m = self.metrics
        m.prefix_queries += req.num_tokens
        m.prefix_hits += hit_tokens
        if req.first_scheduled is None:
            req.cached_tokens = hit_tokens
            admitted.append(req)

    def _finish_transfers(self, now: float) -> None:
        """Transfers that completed by ``now`` join the running batch."""
        still: list[Request] = []
        for req in self.transferring:
            if req.kv_ready_at is not None and req.kv_ready_at <= now:
                self.last_ready = max(self.last_ready, req.kv_ready_at)
                req.status = Status.RUNNING
                req.num_computed = req.prompt_len - 1  # vLLM recomputes the last token
                self._publish_blocks(req, req.prompt_len)
                self.running.append(req)
            else:
                still.append(req)
        self.transferring = still

    def next_transfer_done(self) -> float | None:
        return min((r.kv_ready_at for r in self.transferring if r.kv_ready_at is not None), default=None)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req.blocks)
        req.blocks = []
        req.num_computed = 0
        req.num_cached_blocks = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        req.remote_prefill = False  # the transferred KV is gone: recompute (as vLLM)
        req.external_tokens = 0
        self.metrics.preemptions += 1
        self.waiting.appendleft(req)

    def _publish_blocks(self, req: Request, computed: int) -> None:
        full = min(computed, req.prompt_len) // self.kv.block_size
        if full > req.num_cached_blocks:
            self.kv.cache_blocks(req.blocks, req.hashes, req.num_cached_blocks, full,
                                 req.token_ids, req.lora_info)
            req.num_cached_blocks = full

    # --------------------------------------------------------------- step end
    def apply(self, items: list[tuple[Request, int]], t: float) -> None:
        """Advance the scheduled requests to the end of a step at simulated time ``t``."""
        m = self.metrics
        any_finished = False
        for req, n in items:
            if req.status is not Status.RUNNING:
                continue  # aborted during the step
            req.num_computed += n
            if req.num_cached_blocks < len(req.hashes):
                self._publish_blocks(req, req.num_computed)
            if req.num_computed < req.num_tokens:
                continue  # mid-prefill chunk
            req.num_output += 1
            m.generation_tokens += 1
            if req.first_token_time is None:
                req.first_token_time = t
                m.observe("time_to_first_token_seconds", t - req.arrival)
                record_prompt(m, req)
            else:
                m.observe("inter_token_latency_seconds", t - (req.last_token_time or t))
            req.last_token_time = t
            if req.num_output >= req.target:
                self.finish(req, "length" if req.target >= req.max_tokens else "stop", t)
                any_finished = True
            elif req.num_output == 1 or req.num_output - req.delivered >= req.notify_every:
                req.event.set()
        if any_finished:
            self.running = [r for r in self.running if r.status is Status.RUNNING]

    def finish(self, req: Request, reason: str, t: float) -> None:
        if req.remote_decode:
            req.held = True
            self.on_hold(req)  # blocks stay referenced until pulled or timed out
        else:
            self.kv.free(req.blocks)
            req.blocks = []
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.finish_time = t
        record_finish(self.metrics, req, t)
        req.event.set()

    def abort(self, req: Request, t: float) -> None:
        """Drop a request (client went away or server crashed) and release its blocks."""
        if req.status is Status.FINISHED:
            return
        for queue in (self.waiting, self.running, self.transferring):
            if req in queue:
                queue.remove(req)
        self.kv.free(req.blocks)
        req.blocks = []
        req.status = Status.FINISHED
        req.finish_reason = "abort"
        req.finish_time = t
        self.metrics.success["abort"] += 1
        req.event.set()
