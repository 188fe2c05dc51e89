"""prefix: a longer cached prefix of the prompt scores higher (block level).

Score = matched blocks / prompt blocks (FastDeploy's hit ratio), where an endpoint's match
is the number of leading prompt blocks it was sent before (``state.block_index``: a
block-level prefix tree; every endpoint's match counts, not only the deepest). Blocks are
``block_bytes`` of the prompt text (default 64, ~16 tokens), so sharing inside one
message counts. After each pick the prompt's blocks are recorded for the chosen endpoint,
off the request path. Parameters: ``block_bytes``, ``max_blocks`` (tree size bound,
default 500,000 nodes, least recently used evicted), ``ttl`` (seconds a node lives
unused, default 1800), ``sweep_interval`` (seconds between expiry sweeps, default 60).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Sequence

from ..framework import Candidate, Scorer, Snapshot


@dataclass(frozen=True)
class PrefixConfig:
    block_bytes: int = 64
    max_blocks: int = 500_000
    ttl: float = 1800.0
    sweep_interval: float = 60.0

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if self.block_bytes % 8 or not 8 <= self.block_bytes <= 4096:
            out.append(("block_bytes", "must be a multiple of 8 in 8..4096"))
        if self.max_blocks < 1:
            out.append(("max_blocks", "must be >= 1"))
        if self.ttl <= 0:
            out.append(("ttl", "must be > 0 seconds"))
        if self.sweep_interval <= 0:
            out.append(("sweep_interval", "must be > 0 seconds"))
        return out


class Prefix(Scorer):
    name = "prefix"
    Config = PrefixConfig
    needs_body = True

    def __init__(self, config: PrefixConfig | None = None, weight: float = 1.0) -> None:
        super().__init__(config or PrefixConfig(), weight)
        self.index = None
        self._next_sweep = time.monotonic() + self.config.sweep_interval

    def bind(self, env) -> None:
        c = self.config
        self.index = env.stores.block_index(c.block_bytes, c.max_blocks, c.ttl)

    def match(self, snap: Snapshot):
        return snap.prefix(self.index, self.config.block_bytes)

    def score(self, snap: Snapshot, cands: list[Candidate]) -> list[float]:
        m = self.match(snap)
        return [m.ratio(c.address) for c in cands]

    def prefer(self, snap: Snapshot, k: int) -> Sequence[str]:
        return self.match(snap).holders_deepest()[:k]

    def picked(self, snap: Snapshot, chosen: Candidate) -> None:
        m = self.match(snap)
        if m.total:
            try:
                asyncio.get_running_loop().call_soon(self.index.record, m.keys, chosen.address)
            except RuntimeError:  # no loop (tools, tests): record now
                self.index.record(m.keys, chosen.address)
        if snap.now >= self._next_sweep:
            self._next_sweep = snap.now + self.config.sweep_interval
            self.index.expire()


PLUGIN = Prefix
