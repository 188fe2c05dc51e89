"""scheduler: a policy written as a composition of the scheduling framework in ``lb_config``.

    lb_policy: scheduler
    lb_config:
      filters: [{name: healthy}, {name: queue_below, threshold: 50}]
      scorers: [{name: queue, weight: 2}, {name: kv_cache, weight: 2}]
      picker: {name: max_score}          # or weighted_random {sharpness}, top_k {k}

``ScheduledPolicy`` is also the base of every named preset (``request_num``,
``power_of_two``, ``fd_metrics_score``, ``least_kv_cache``, ...): a preset is a fixed
composition with the config keys of the system it comes from. What every composition
gets from the base:

* decisions flat in fleet size (``extproc.scheduling.scheduler``: at most
  ``max_candidates`` endpoints are scored, default 16, preselected from an incremental
  load index; a fleet that small or smaller is scored whole);
* assumed load: each pick is counted on its endpoint, with the request's estimated prompt
  tokens, until a scrape shows it or it ends (``extproc.signals.load``);
* upstream errors against the endpoint (``observe_errors``, default on: the policy asks
  Envoy for the response status, one more message per request) for the ``healthy`` filter;
* metrics scraped for as long as the route exists, when a plugin reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

from ..core import Decision, Endpoint, Fallback
from ..scheduling import FilterList, PickerSpec, PluginSpec, Profile, Scheduler, ScorerList, spec
from ..signals import ScrapeSpec
from ..signals.load import EndpointLoad
from ..telemetry import RateLimitedLog
from .base import Policy, PolicyConfig


@dataclass(frozen=True)
class LoadAwareConfig(PolicyConfig):
    max_candidates: int = 16      # endpoints scored per decision (preselected by load beyond that)
    observe_errors: bool = True   # read the upstream status: 5xx and connect failures count against an endpoint

    def validate(self) -> list[tuple[str, str]]:
        return [] if self.max_candidates >= 2 else [("max_candidates", "must be >= 2")]


@dataclass(frozen=True)
class MetricsAwareConfig(LoadAwareConfig):
    scrape_interval: float = 0.1  # seconds between /metrics scrapes of each endpoint
    scrape_timeout: float = 0.5
    stale_after: float = 1.0      # a scrape older than this is unknown, never zero
    metrics_path: str = "/metrics"

    def validate(self) -> list[tuple[str, str]]:
        p = super().validate()
        if self.scrape_interval <= 0:
            p.append(("scrape_interval", "must be > 0 seconds"))
        if self.scrape_timeout <= 0:
            p.append(("scrape_timeout", "must be > 0 seconds"))
        if self.stale_after <= self.scrape_interval:
            p.append(("stale_after", f"must be longer than scrape_interval ({self.scrape_interval})"))
        if not self.metrics_path.startswith("/"):
            p.append(("metrics_path", "must start with /"))
        return p


class ScheduledPolicy(Policy):
    """A policy that is one framework profile. Subclasses define ``profile_specs`` (and may
    override ``index_key``, ``preselect``, ``extra_metrics``)."""

    preselect: ClassVar[str] = "least"
    fallback_reason: ClassVar[str] = "no_candidate"

    def __init__(self, config: LoadAwareConfig, env) -> None:
        super().__init__(config, env)
        filters, scorers, picker = self.profile_specs(config)
        self.profile = Profile([s.build() for s in filters], [s.build() for s in scorers], picker.build())
        for p in self.profile.plugins:
            p.bind(env)
        self.needs_body = self.profile.needs_body
        self.first_token_sample = self.profile.ttft_sample
        self.notes = any(p.keeps_notes for p in self.profile.plugins)
        self.stale_after = getattr(config, "stale_after", 1.0)
        self.scheduler = Scheduler(env.load, self.profile, stale_after=self.stale_after,
                                   max_candidates=self.max_candidates(config), index_key=self.index_key(),
                                   preselect=self.preselect)
        self.needs_response_headers = config.observe_errors
        self.status_only = True   # observe_errors reads only ctx.status (the access log gives it too)
        self.scraper = None
        if self.profile.uses_metrics:
            c = config
            self.scraper = env.scrapes.subscribe(ScrapeSpec(
                interval=getattr(c, "scrape_interval", 0.1), timeout=getattr(c, "scrape_timeout", 0.5),
                stale_after=self.stale_after, path=getattr(c, "metrics_path", "/metrics"),
                extra=self.extra_metrics(config)))
        self._log = RateLimitedLog(10.0)

    # -- what a preset defines ------------------------------------------------------------
    def profile_specs(self, config) -> tuple[Sequence[PluginSpec], Sequence[PluginSpec], PluginSpec]:
        raise NotImplementedError

    def index_key(self) -> Callable[[EndpointLoad], int]:
        """The load that preselection sorts by (only used beyond ``max_candidates``)."""
        if not self.profile.uses_metrics:
            return lambda r: r.requests
        clock, stale = self.env.load.clock, self.stale_after
        return lambda r: int(r.total(clock(), stale))

    def max_candidates(self, config) -> int:
        return config.max_candidates

    def extra_metrics(self, config) -> tuple[str, ...]:
        return ()

    # -- the policy -------------------------------------------------------------------------
    def on_candidates(self, candidates: Sequence[Endpoint]) -> None:
        self.scheduler.on_candidates(candidates)
        for p in self.profile.plugins:
            p.on_candidates(candidates)
        if self.scraper is not None:
            self.scraper.want(e.address for e in candidates)

    async def pick(self, ctx, candidates: Sequence[Endpoint]) -> Decision:
        return self.decide(ctx, candidates)

    def decide(self, ctx, candidates: Sequence[Endpoint]) -> Decision:
        """The synchronous core of ``pick`` (nothing here waits, so one decision sees one
        consistent view and no other decision runs in between)."""
        if not candidates:
            return Fallback("no_healthy_endpoints")
        if self.notes:
            ctx.policy_state = {}  # plugins note what the decision used (for a TTFT sample, the request's end)
        c, snap = self.scheduler.run(ctx, candidates)
        if c is not None:
            if self.profile.counts_tokens:
                ctx.prompt_tokens = snap.prompt_tokens
            for p in self.profile.plugins:
                p.picked(snap, c)   # may count events too: merged below with the rest
        if snap.events:
            st = self.stats
            for k, n in snap.events.items():
                st[k] = st.get(k, 0) + n
            self.noticed(snap.events)
        if c is None:
            self.stats[self.fallback_reason] = self.stats.get(self.fallback_reason, 0) + 1
            return Fallback(self.fallback_reason)
        return c.endpoint

    def on_first_token(self, ctx, ttft: float) -> None:
        for p in self.profile.plugins:
            p.first_token(ctx, ttft)

    def on_done(self, ctx) -> None:
        if self.notes:
            for p in self.profile.plugins:
                p.done(ctx)

    def noticed(self, events: dict[str, int]) -> None:
        """Hook: what the plugins counted in this decision (already added to ``stats``)."""

    async def close(self) -> None:
        if self.scraper is not None:
            self.scraper.close()
        self.scheduler.close()
        for p in self.profile.plugins:   # plugins that follow endpoints (KV-event subscriptions) let go
            close = getattr(p, "close", None)
            if close is not None:
                close()


@dataclass(frozen=True)
class SchedulerConfig(MetricsAwareConfig):
    filters: FilterList = FilterList(())
    scorers: ScorerList = ScorerList(())
    picker: PickerSpec | None = None     # default: max_score


class SchedulerPolicy(ScheduledPolicy):
    name = "scheduler"
    Config = SchedulerConfig

    def profile_specs(self, config: SchedulerConfig):
        return config.filters, config.scorers, config.picker or spec("picker", "max_score")


POLICY = SchedulerPolicy
