"""Engine-side state of one generation request."""
from __future__ import annotations

import asyncio
import enum


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


class Request:
    """One request as the scheduler sees it (times are simulated seconds).

    PD fields: ``remote_decode`` (a prefill for another server: its blocks are held after
    it finishes, until pulled or timed out), ``remote_prefill`` (the prompt's KV comes
    from another server: no prefill compute, a transfer time instead), ``kv_ready_at``
    (when that transfer ends), ``external_tokens`` (prompt tokens it brought).
    """

    __slots__ = (
        "id", "prompt_len", "token_ids", "hashes", "max_tokens", "target", "lora", "lora_id",
        "arrival", "arrival_wall", "num_computed", "num_output", "blocks", "num_cached_blocks",
        "status", "finish_reason", "first_scheduled", "first_token_time", "last_token_time",
        "finish_time", "num_preemptions", "cached_tokens", "computed_prompt_tokens", "event",
        "notify_every", "delivered", "remote_decode", "remote_prefill", "kv_ready_at",
        "external_tokens", "held",
    )

    def __init__(self, rid: str, token_ids: list[int], hashes: list[int], max_tokens: int,
                 target: int, lora: str | None, arrival: float, arrival_wall: float,
                 notify_every: int = 1, lora_id: int | None = None) -> None:
        self.id = rid
        self.prompt_len = len(token_ids)
        self.token_ids = token_ids
        self.hashes = hashes
        self.max_tokens = max_tokens
        self.target = target
        self.lora = lora
        self.lora_id = lora_id
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
        self.remote_decode = False
        self.remote_prefill = False
        self.kv_ready_at: float | None = None
        self.external_tokens = 0
        self.held = False  # blocks kept for a remote decode after finishing

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + self.num_output

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def lora_info(self) -> tuple[int, str] | None:
        return (self.lora_id or 0, self.lora) if self.lora else None
