"""kv_room: keep endpoints with room in their KV cache.

Room means estimated KV-cache usage (scraped, plus the blocks of picks assumed since)
below ``max_usage`` (default 0.95): an engine whose cache is full preempts or queues.
Endpoints whose usage is unknown are kept (no data is not a reason to exclude).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..framework import Candidate, Filter, Snapshot


@dataclass(frozen=True)
class KvRoomConfig:
    max_usage: float = 0.95

    def validate(self) -> list[tuple[str, str]]:
        return [] if 0 < self.max_usage <= 1 else [("max_usage", "must be in (0, 1]")]


class KvRoom(Filter):
    name = "kv_room"
    uses_metrics = True
    Config = KvRoomConfig

    def filter(self, snap: Snapshot, cands: list[Candidate]) -> list[Candidate]:
        lim = self.config.max_usage
        return [c for c in cands if c.kv is None or c.kv < lim]


PLUGIN = KvRoom
