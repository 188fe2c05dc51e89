"""estimated_ttft: a shorter predicted time to first token scores higher (FlexLB's prefill).

For each candidate: TTFT = base + per_token x (its prefill backlog + this request's
uncached tokens + ``hit_cost`` x cached tokens) + per_running x running sequences
(``signals.ttft_model``). Cached tokens come from the block-level prefix tree (the same
as the ``prefix`` scorer's, parameters ``block_bytes``, ``max_blocks``, ``ttl``); the
backlog is the work ai-lb sent there, drained at the calibrated prefill rate; running is
the scraped count with assumed load. The model is calibrated online from the TTFT of a
``sample`` fraction of responses (default 0.1; each watched response costs one ext_proc
message per body chunk until its first token); a request's work leaves the backlog when
its first token is seen or it ends. Score = best estimate / own estimate
(1 for the fastest); the estimates are left in the snapshot for the ``near_ties`` picker.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ...signals.ttft_model import TtftModel
from ..framework import Candidate, Scorer, Snapshot


@dataclass(frozen=True)
class EstimatedTtftConfig:
    hit_cost: float = 0.3
    sample: float = 0.1
    block_bytes: int = 64
    max_blocks: int = 500_000
    ttl: float = 1800.0

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if not 0 <= self.hit_cost <= 1:
            out.append(("hit_cost", "must be in [0, 1]"))
        if not 0 <= self.sample <= 1:
            out.append(("sample", "must be in [0, 1]"))
        if self.block_bytes % 8 or not 8 <= self.block_bytes <= 4096:
            out.append(("block_bytes", "must be a multiple of 8 in 8..4096"))
        return out


class EstimatedTtft(Scorer):
    name = "estimated_ttft"
    Config = EstimatedTtftConfig
    needs_body = True
    uses_metrics = True
    keeps_notes = True

    def __init__(self, config: EstimatedTtftConfig | None = None, weight: float = 1.0) -> None:
        super().__init__(config or EstimatedTtftConfig(), weight)
        self.model = TtftModel(hit_cost=self.config.hit_cost)
        self.ttft_sample = self.config.sample
        self.index = None

    def bind(self, env) -> None:
        c = self.config
        self.index = env.stores.block_index(c.block_bytes, c.max_blocks, c.ttl)

    def estimates(self, snap: Snapshot, cands: list[Candidate]) -> dict[str, tuple[float, tuple]]:
        est = snap.notes.get("ttft")
        if est is None:
            est = snap.notes["ttft"] = {}
        m = snap.prefix(self.index, self.config.block_bytes)
        tokens = snap.prompt_tokens
        per_block = tokens / m.total if m.total else 0.0
        model = self.model
        for c in cands:
            if c.address not in est:
                cached = m.depth(c.address) * per_block
                f = model.features(c.address, model.work(tokens, cached), c.running, snap.now)
                est[c.address] = (model.predict(f), f, model.work(tokens, cached))
        return est

    def score(self, snap: Snapshot, cands: list[Candidate]) -> list[float]:
        est = self.estimates(snap, cands)
        vals = [est[c.address][0] for c in cands]
        best = min(vals)
        return [best / v if v > 0 else 1.0 for v in vals]

    def prefer(self, snap: Snapshot, k: int):
        return snap.prefix(self.index, self.config.block_bytes).holders_deepest()[:k]

    def picked(self, snap: Snapshot, chosen: Candidate) -> None:
        est = self.estimates(snap, [chosen])[chosen.address]
        self.model.sent(chosen.address, est[2], snap.now)
        notes = snap.ctx.policy_state
        if isinstance(notes, dict):
            notes["ttft"] = (chosen.address, est[1], est[2])   # endpoint, features, work
        m = snap.prefix(self.index, self.config.block_bytes)
        if m.total:
            try:
                asyncio.get_running_loop().call_soon(self.index.record, m.keys, chosen.address)
            except RuntimeError:
                self.index.record(m.keys, chosen.address)

    def first_token(self, ctx, ttft: float) -> None:
        noted = self._prefilled(ctx)
        if noted is not None:
            self.model.observe(noted[1], ttft)

    def done(self, ctx) -> None:
        self._prefilled(ctx)

    def _prefilled(self, ctx):
        """Take the request's work off its endpoint's backlog, once."""
        notes = ctx.policy_state
        noted = notes.pop("ttft", None) if isinstance(notes, dict) else None
        if noted is not None:
            self.model.prefilled(noted[0], noted[2])
        return noted


PLUGIN = EstimatedTtft
