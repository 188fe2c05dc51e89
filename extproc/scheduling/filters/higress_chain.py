"""higress_chain: Higress's (= the early Gateway API Inference Extension's) filter chain.

For a critical request, with Higress's constants:

1. keep endpoints with fewer than ``queue_threshold`` (50) waiting requests;
2. among those, if the request names a LoRA adapter, prefer endpoints that have it loaded,
   else ones with a free adapter slot;
3. then the least-queued band ``[min, min + (max-min)/N]``, then the lowest-KV band.

If no endpoint has fewer than 50 waiting: least-queued band, then "has the adapter or a
free slot", then lowest-KV band. The LoRA steps run only when the request's ``model`` is
an adapter (it is loaded somewhere, or it is not a base model name, while some endpoint
exports ``vllm:lora_requests_info``).

Unlike Higress, queue and KV are read with the load assumed for picks made since the
last scrape, so consecutive decisions inside one scrape interval spread out instead of
all landing on the endpoint that looked idle. A metric missing on some endpoints is
decided without there (counted as ``missing:<metric>``), never silently turned off.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...core import BodyError
from ...signals.metrics import KV, WAITING
from ..framework import Candidate, Filter, Snapshot
from .band import band

_WAITING, _KV = WAITING[0], KV[0]


@dataclass(frozen=True)
class HigressChainConfig:
    queue_threshold: float = 50

    def validate(self) -> list[tuple[str, str]]:
        return [] if self.queue_threshold > 0 else [("queue_threshold", "must be > 0")]


def adapter(snap: Snapshot, cands: list[Candidate]) -> str | None:
    """The request's LoRA adapter, if its ``model`` is one (needs LoRA metrics)."""
    if not any(c.metrics is not None and c.metrics.lora is not None for c in cands):
        return None
    try:
        model = snap.ctx.model
    except BodyError:
        return None
    if not model:
        return None
    base: set[str] = set()
    for c in cands:
        m = c.metrics
        if m is None:
            continue
        if m.lora is not None and model in m.lora.active:
            return model
        base.update(m.models)
    return model if base and model not in base else None


def _has(c: Candidate, a: str) -> bool:
    lora = c.metrics.lora if c.metrics is not None else None
    return lora is not None and a in lora.active


def _room(c: Candidate) -> bool:
    lora = c.metrics.lora if c.metrics is not None else None
    return lora is not None and len(lora.active) < lora.max_loras


class HigressChain(Filter):
    name = "higress_chain"
    uses_metrics = True
    Config = HigressChainConfig

    def _band(self, snap: Snapshot, cands: list[Candidate], metric: str) -> list[Candidate]:
        kept, missing = band(cands, metric)
        if missing:
            snap.count(f"missing:{metric}")
        return kept

    def filter(self, snap: Snapshot, cands: list[Candidate]) -> list[Candidate]:
        a = adapter(snap, cands)
        have = [c for c in cands if c.metric(_WAITING) is not None]
        if len(have) < len(cands):
            snap.count(f"missing:{_WAITING}")
        low = [c for c in have if c.waiting < self.config.queue_threshold] if have else cands
        if low:
            s = low
            if a is not None:
                s = [c for c in s if _has(c, a)] or [c for c in s if _room(c)] or s
            return self._band(snap, self._band(snap, s, _WAITING), _KV)
        s = self._band(snap, cands, _WAITING)
        if a is not None:
            s = [c for c in s if _has(c, a) or _room(c)] or s
        return self._band(snap, s, _KV)


PLUGIN = HigressChain
