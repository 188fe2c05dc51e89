"""precise_prefix: the share of the prompt's tokens each endpoint really holds in its KV cache.

The engines' own KV-cache events (``signals.kv_events``) say which blocks each one
holds; the prompt is tokenized as the engine does (``signals.prompt_tokens``: the model's
tokenizer and chat template), cut into the engine's blocks and keyed like the index
(``state.kv_block_index.chain_keys``). An endpoint's match is its longest cached prefix,
capped as vLLM caps a hit (the last prompt token is always computed). Score = cached
tokens / prompt tokens.

Two complements:

* **in flight**: the prompt of a request routed to an endpoint and not finished yet
  counts there (``max`` with the events' match), as assumed load does for the queue:
  its blocks are being computed and its ``BlockStored`` has not arrived. So a burst
  sharing a new prefix does not spread it over every endpoint; once the request ends,
  the events alone say what stayed cached (block-level keys of the prompt text, as the
  ``prefix`` scorer's; ``pending: false`` switches it off);
* **fallback**: an endpoint whose events are missing or stale (never heard, socket
  down, a replay or rebuild running, silent through requests that must have stored
  blocks) is scored by the approximate block-level ``prefix`` match (what ai-lb sent
  there), and each such score is counted as ``fallback:<reason>``. A prompt that cannot
  be tokenized (``tokenize_error``) falls back for every endpoint.

Parameters: ``tokenizer`` (a model directory with ``tokenizer.json`` and
``tokenizer_config.json``), ``kv_events`` (where each backend's events come from,
``signals.kv_events.spec``), ``block_size`` (0: the events' own, else
``vllm:cache_config_info``, else 16), ``content_format``, ``lora_adapters`` (model names
that are LoRA adapters; names seen in events count too), ``pending`` (true),
``block_bytes``/``max_blocks``/``ttl`` of the approximate index.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from ...core import BodyError
from ...signals.kv_events import KvEventsHub, KvEventsSpec
from ...signals.prompt_tokens import PromptTokenizer, TokenizeError
from ...state.kv_block_index import chain_keys
from ..framework import Candidate, Scorer, Snapshot
from .prefix import Prefix, PrefixConfig

DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class PrecisePrefixConfig:
    tokenizer: str = ""
    kv_events: KvEventsSpec = KvEventsSpec()
    block_size: int = 0
    content_format: Literal["auto", "string", "openai"] = "auto"
    lora_adapters: tuple[str, ...] = ()
    pending: bool = True
    block_bytes: int = 64
    max_blocks: int = 500_000
    ttl: float = 1800.0
    cache_tokens: int = 2_000_000

    def validate(self) -> list[tuple[str, str]]:
        p = []
        if not self.tokenizer:
            p.append(("tokenizer", "required: a model directory with tokenizer.json (and tokenizer_config.json)"))
        elif not (Path(self.tokenizer) / "tokenizer.json").is_file():
            p.append(("tokenizer", f"no tokenizer.json in {self.tokenizer!r}"))
        if self.block_size and not 1 <= self.block_size <= 4096:
            p.append(("block_size", "must be 0 (from the engine) or 1..4096 tokens"))
        if self.cache_tokens < 0:
            p.append(("cache_tokens", "must be >= 0"))
        p += [(f, m) for f, m in PrefixConfig(self.block_bytes, self.max_blocks, self.ttl).validate()]
        return p


class _Match:
    """This request against the index, computed once per decision."""

    __slots__ = ("tokens", "n", "salt", "first_salt", "error", "_by_bs")

    def __init__(self, tokens: list[int], salt: int, first_salt: int | None, error: str | None = None) -> None:
        self.tokens, self.n, self.salt, self.first_salt, self.error = tokens, len(tokens), salt, first_salt, error
        self._by_bs: dict[int, tuple[list[int], dict[int, int]]] = {}

    def slots(self, hub: KvEventsHub, bs: int) -> tuple[list[int], dict[int, int]]:
        got = self._by_bs.get(bs)
        if got is None:
            keys = chain_keys(self.tokens, bs, self.salt, self.first_salt)
            got = self._by_bs[bs] = (keys, hub.index.match(keys))
        return got


class PrecisePrefix(Scorer):
    name = "precise_prefix"
    Config = PrecisePrefixConfig
    needs_body = True
    keeps_notes = True

    def __init__(self, config: PrecisePrefixConfig | None = None, weight: float = 1.0) -> None:
        super().__init__(config or PrecisePrefixConfig(), weight)
        c = self.config
        self.fallback = Prefix(PrefixConfig(c.block_bytes, c.max_blocks, c.ttl))
        self.pending: dict[str, dict[int, int]] | None = {} if c.pending else None   # address -> key -> requests
        self.hub: KvEventsHub | None = None
        self.tokenizer: PromptTokenizer | None = None
        self.counts: dict[str, int] = {}     # picks: precise_hit, precise_miss, fallback_pick

    def take_counts(self) -> dict[str, int]:
        c, self.counts = self.counts, {}
        return c

    def bind(self, env) -> None:
        c = self.config
        self.fallback.bind(env)
        self.hub = env.stores.shared(("kv_events", c.kv_events), lambda: KvEventsHub(c.kv_events))
        self.tokenizer = env.stores.shared(("prompt_tokenizer", c.tokenizer, c.content_format, c.cache_tokens),
                                           lambda: PromptTokenizer(c.tokenizer, c.content_format, c.cache_tokens))

    def on_candidates(self, endpoints: Sequence) -> None:
        if self.hub is not None:
            self.hub.want(self, [e.address for e in endpoints])

    def close(self) -> None:
        if self.hub is not None:
            self.hub.release(self)

    # -- this request ---------------------------------------------------------------------------
    def match(self, snap: Snapshot) -> _Match:
        m = snap.notes.get("precise")
        if m is not None:
            return m
        hub, tok = self.hub, self.tokenizer
        try:
            doc = snap.ctx.json()
            tokens = tok.tokens(doc)
        except (BodyError, TokenizeError, AttributeError):
            m = snap.notes["precise"] = _Match([], 0, None, "tokenize_error")
            return m
        model = doc.get("model")
        lora = model if isinstance(model, str) and (model in hub.index.lora_names or
                                                    model in self.config.lora_adapters) else None
        cs = doc.get("cache_salt")
        salt = hub.index.salt(lora)
        first = hub.index.salt(lora, (cs,)) if isinstance(cs, str) and cs else None
        m = snap.notes["precise"] = _Match(tokens, salt, first)
        return m

    def _block_size(self, c: Candidate, view_bs: int) -> int:
        if self.config.block_size:
            return self.config.block_size
        if view_bs:
            return view_bs
        met = c.load.metrics
        return met.block_size if met is not None and met.block_size else DEFAULT_BLOCK_SIZE

    def cached(self, snap: Snapshot, c: Candidate) -> tuple[float | None, str | None]:
        """(cached tokens / prompt tokens, None) from the events, or (None, why not)."""
        m = self.match(snap)
        if m.error is not None:
            return None, m.error
        st = self.hub.stream(c.address)
        if st is None:
            return None, "not_followed"
        why = st.live(snap.now)
        if why is not None:
            return None, why
        if m.n < 2:
            return 0.0, None
        bs = self._block_size(c, st.view.block_size)
        _, slots = m.slots(self.hub, bs)
        depth = min(slots.get(st.view.slot, 0), (m.n - 1) // bs)
        return depth * bs / m.n, None

    def score(self, snap: Snapshot, cands: list[Candidate]) -> list[float]:
        out = []
        for c in cands:
            r, why = self.cached(snap, c)
            if r is None:
                snap.count(f"fallback:{why}")
                r = self.fallback.match(snap).ratio(c.address)
            elif self.pending is not None:
                r = max(r, self._pending(snap, c.address))
            out.append(r)
        return out

    def _pending(self, snap: Snapshot, address: str) -> float:
        held = self.pending.get(address)
        if not held:
            return 0.0
        keys = self.fallback.match(snap).keys
        lo, hi = 0, len(keys)             # an in-flight prompt adds all its chain keys: prefix-closed
        while lo < hi:
            mid = (lo + hi) // 2
            if int(keys[mid]) in held:
                lo = mid + 1
            else:
                hi = mid
        return lo / len(keys) if len(keys) else 0.0

    def prefer(self, snap: Snapshot, k: int) -> Sequence[str]:
        m = self.match(snap)
        out: list[str] = []
        if m.error is None and m.n >= 2:
            views = self.hub.index.views()
            bs = self.config.block_size or next((v.block_size for v in views if v.block_size), DEFAULT_BLOCK_SIZE)
            _, slots = m.slots(self.hub, bs)
            by_slot = {v.slot: v.address for v in views}
            out = [by_slot[s] for s, _ in sorted(slots.items(), key=lambda x: -x[1])[:k] if s in by_slot]
        return out + [a for a in self.fallback.prefer(snap, k) if a not in out]

    def picked(self, snap: Snapshot, chosen: Candidate) -> None:
        self.fallback.picked(snap, chosen)
        r, why = self.cached(snap, chosen)
        k = "precise_hit" if r else "precise_miss" if r is not None else "fallback_pick"
        self.counts[k] = self.counts.get(k, 0) + 1
        m = self.match(snap)
        notes = snap.ctx.policy_state
        if not isinstance(notes, dict):
            return
        bs = self.config.block_size or DEFAULT_BLOCK_SIZE
        if m.error is None and (r is None or m.n - r * m.n >= bs + 1):
            notes["precise"] = (chosen.address, snap.now)   # blocks to store: an event must follow
        if self.pending is not None:
            keys = self.fallback.match(snap).keys.tolist()
            if keys:
                held = self.pending.setdefault(chosen.address, {})
                for k in keys:
                    held[k] = held.get(k, 0) + 1
                notes["pending"] = (chosen.address, keys)

    def done(self, ctx) -> None:
        notes = ctx.policy_state
        inflight = notes.pop("pending", None) if isinstance(notes, dict) else None
        if inflight is not None and self.pending is not None:
            held = self.pending.get(inflight[0], {})
            for k in inflight[1]:
                n = held.get(k, 0) - 1
                if n > 0:
                    held[k] = n
                else:
                    held.pop(k, None)
            if not held:
                self.pending.pop(inflight[0], None)
        noted = notes.pop("precise", None) if isinstance(notes, dict) else None
        if noted is None or ctx.outcome not in ("complete", "unobserved") or self.hub is None:
            return
        st = self.hub.stream(noted[0])
        if st is not None:
            st.request_done(noted[1])


PLUGIN = PrecisePrefix
