"""The scheduling framework: filters, then weighted scorers, then a picker.

In the spirit of the Gateway API Inference Extension's scheduler
(``pkg/epp/scheduling/framework``): a decision takes one ``Snapshot`` of the signals for
the route's candidates, runs each ``Filter`` (which keeps a subset), each ``Scorer``
(a score in [0, 1] per candidate, higher is better, times the scorer's weight), and a
``Picker`` that chooses from the totals. A ``Profile`` is one such composition; a policy
is a profile (or several: PD runs one for prefill and one for decode) built from config.

Filters fail soft: a filter that would leave no candidate is skipped, counted in the
profile's ``stats["filter_empty:<name>"]``, so a strict-looking rule never turns into a
failed request (the core's fail-open rule). A filter may declare itself ``strict`` to
make an empty result final (the decision then falls back).
"""

from __future__ import annotations

import time
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from ..core import Endpoint, RequestContext
from ..signals.load import EndpointLoad, LoadView
from ..signals.metrics import CANONICAL, RUNNING, WAITING

if TYPE_CHECKING:
    from ..signals.metrics import EndpointMetrics

CHARS_PER_TOKEN = 4   # prompt size estimate: ~4 characters of JSON per token
_WAITING, _RUNNING = WAITING[0], RUNNING[0]
_UNSET: Any = object()


class Candidate:
    """One endpoint as this decision sees it. Each estimate is computed on first use and
    then held for the rest of the decision, so every plugin reads the same numbers."""

    __slots__ = ("endpoint", "load", "snap", "metrics", "_waiting", "_running", "_total", "_kv")

    def __init__(self, endpoint: Endpoint, load: EndpointLoad, snap: "Snapshot") -> None:
        self.endpoint = endpoint
        self.load = load
        self.snap = snap
        m = load.metrics
        # The last scrape if fresh (younger than the profile's ``stale_after``), else None.
        self.metrics: "EndpointMetrics | None" = m if m is not None and snap.now - m.at <= snap.stale_after else None
        self._waiting = self._running = self._total = self._kv = _UNSET

    @property
    def address(self) -> str:
        return self.endpoint.address

    @property
    def waiting(self) -> float:
        v = self._waiting
        if v is _UNSET:
            v = self._waiting = self.load.waiting(self.snap.now, self.snap.stale_after)
        return v

    @property
    def running(self) -> float:
        v = self._running
        if v is _UNSET:
            v = self._running = self.load.running(self.snap.now, self.snap.stale_after)
        return v

    @property
    def total(self) -> float:
        v = self._total
        if v is _UNSET:
            v = self._total = self.load.total(self.snap.now, self.snap.stale_after)
        return v

    @property
    def kv(self) -> float | None:
        v = self._kv
        if v is _UNSET:
            v = self._kv = self.load.kv(self.snap.now, self.snap.stale_after)
        return v

    @property
    def requests(self) -> int:
        """This process's requests in flight there."""
        return self.load.requests

    @property
    def tokens(self) -> int:
        """Prompt tokens of this process's requests in flight there."""
        return self.load.tokens

    def metric(self, name: str) -> float | None:
        """Any scraped metric by name; the queue, running and KV names give the estimates
        with assumed load (so every policy that reads them sees its own recent picks)."""
        m = self.metrics
        if m is None:
            return None
        canon = CANONICAL.get(name)
        if canon is None:
            return m.get(name)
        if canon == _WAITING:
            return self.waiting if m.waiting is not None else None
        if canon == _RUNNING:
            return self.running if m.running is not None else None
        return self.kv

    def __repr__(self) -> str:
        return f"<Candidate {self.address}>"


class Snapshot:
    """What one decision knows: the request, the time, and the candidates' views."""

    def __init__(self, ctx: RequestContext, view: LoadView, endpoints: Sequence[Endpoint],
                 stale_after: float = 1.0, now: float | None = None,
                 loads: Sequence[EndpointLoad] | None = None) -> None:
        self.ctx = ctx
        self.view = view
        self.now = time.monotonic() if now is None else now
        self.stale_after = stale_after
        if loads is None:
            rec = view.record
            loads = [rec(e.address) for e in endpoints]
        self.candidates = [Candidate(e, r, self) for e, r in zip(endpoints, loads)]
        self.events: dict[str, int] = {}   # what plugins noticed (missing metrics, ...), for the policy's stats
        self._prefix: dict[int, Any] = {}
        self.notes: dict[str, Any] = {}    # per-decision facts plugins share (e.g. TTFT estimates)

    def set_candidates(self, endpoints: Sequence[Endpoint]) -> None:
        rec = self.view.record
        self.candidates = [Candidate(e, rec(e.address), self) for e in endpoints]

    def prefix(self, index: Any, block_bytes: int) -> Any:
        """This request's prompt blocks against ``index`` (computed once per decision)."""
        m = self._prefix.get(block_bytes)
        if m is None:
            from .prefix_match import PrefixMatch

            m = self._prefix[block_bytes] = PrefixMatch(self.ctx, index, block_bytes)
        return m

    def count(self, what: str, n: int = 1) -> None:
        self.events[what] = self.events.get(what, 0) + n

    @cached_property
    def prompt_tokens(self) -> int:
        """The request's prompt size in tokens, estimated without parsing: the buffered
        body's length if the policy read it, else the ``content-length`` header."""
        body = self.ctx.body
        if body is not None:
            return len(body) // CHARS_PER_TOKEN
        try:
            return int(self.ctx.headers.get("content-length", "0")) // CHARS_PER_TOKEN
        except ValueError:
            return 0


class Plugin:
    """Base of every filter, scorer and picker: a ``name`` (the key in config) and a typed
    ``Config`` dataclass (the other keys of its config entry)."""

    kind: ClassVar[str]
    name: ClassVar[str]
    Config: ClassVar[type] = type(None)
    uses_metrics: bool = False   # reads scraped metrics: the policy then subscribes to scrapes
    uses_tokens: bool = False    # reads prompt tokens in flight: the request's own size is then estimated
    needs_body: bool = False     # reads the prompt: the policy then asks Envoy for the body
    ttft_sample: float = 0.0     # fraction of responses whose first token it wants to hear of
    keeps_notes: bool = False    # notes per request (ctx.policy_state) for first_token / done

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def bind(self, env: Any) -> None:
        """Called once with the policy's environment (shared state such as the block index)."""

    def on_candidates(self, endpoints: Sequence[Endpoint]) -> None:
        """The route's candidates changed (discovery)."""

    def prefer(self, snap: "Snapshot", k: int) -> Sequence[str]:
        """Endpoints this plugin wants scored even when preselection would leave them out
        (a big fleet: e.g. the holders of the request's prefix)."""
        return ()

    def picked(self, snap: "Snapshot", chosen: "Candidate") -> None:
        """The decision went to ``chosen`` (record what the plugin needs to remember)."""

    def done(self, ctx: RequestContext) -> None:
        """A request this plugin's policy routed has ended (exactly once)."""

    def first_token(self, ctx: RequestContext, ttft: float) -> None:
        """A watched response (``ttft_sample``) produced its first token ``ttft`` s after
        the request arrived."""


class Filter(Plugin):
    kind = "filter"
    strict: ClassVar[bool] = False

    def filter(self, snap: Snapshot, cands: list[Candidate]) -> list[Candidate]:
        raise NotImplementedError


class Scorer(Plugin):
    kind = "scorer"

    def __init__(self, config: Any = None, weight: float = 1.0) -> None:
        super().__init__(config)
        self.weight = weight

    def score(self, snap: Snapshot, cands: list[Candidate]) -> list[float]:
        """One score per candidate, each in [0, 1]; higher is better."""
        raise NotImplementedError


class Picker(Plugin):
    kind = "picker"

    def pick(self, snap: Snapshot, cands: list[Candidate], totals: list[float]) -> Candidate:
        raise NotImplementedError


class Profile:
    """One composition: filters -> weighted scorers -> picker."""

    def __init__(self, filters: Sequence[Filter], scorers: Sequence[Scorer], picker: Picker) -> None:
        self.filters = tuple(filters)
        self.scorers = tuple(s for s in scorers if s.weight > 0)  # a weight of 0 switches a scorer off
        self.picker = picker
        self.plugins = (*self.filters, *self.scorers, picker)
        self.stats: dict[str, int] = {}
        plugins = self.plugins
        self.uses_metrics = any(p.uses_metrics for p in plugins)
        # Prompt sizes matter to token counts and to KV usage (assumed blocks).
        self.counts_tokens = self.uses_metrics or any(p.uses_tokens for p in plugins)
        self.needs_body = any(p.needs_body for p in plugins)
        self.ttft_sample = max((p.ttft_sample for p in plugins), default=0.0)

    def run(self, snap: Snapshot, cands: list[Candidate] | None = None) -> Candidate | None:
        cands = snap.candidates if cands is None else cands
        for f in self.filters:
            if len(cands) <= 1 and not f.strict:
                continue  # nothing left to choose between
            kept = f.filter(snap, cands)
            if kept:
                cands = kept
            elif f.strict:
                self._count(f"filter_empty:{f.name}")
                return None
            else:
                self._count(f"filter_empty:{f.name}")
        if not cands:
            return None
        if len(cands) == 1:
            return cands[0]
        totals = [0.0] * len(cands)
        for s in self.scorers:
            w = s.weight
            for i, v in enumerate(s.score(snap, cands)):
                totals[i] += w * v
        return self.picker.pick(snap, cands, totals)

    def _count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1


def inverse_minmax(values: Sequence[float]) -> list[float]:
    """Scores for "lower is better" values: 1 at the minimum, 0 at the maximum, linear in
    between; all 1 when every value is equal."""
    lo, hi = min(values), max(values)
    if hi <= lo:
        return [1.0] * len(values)
    span = hi - lo
    return [(hi - v) / span for v in values]
