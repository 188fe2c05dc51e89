"""endpoint_metrics (alias ``metrics_based``): route by the model servers' own /metrics.

Compatible with Higress ``ai-load-balancer``'s policy of the same name (same ``lb_config``
field names and defaults), minus its defects (see docs/policies/endpoint_metrics.md).

Metrics come from the gateway's scraper service (``extproc.signals.scraper``): every
candidate endpoint's ``/metrics`` is fetched every ``scrape_interval`` seconds for as long
as the route exists, whether or not requests arrive; the candidates follow discovery.

``metric_policy``:

* ``default``: Higress's (= early Gateway API Inference Extension) filter chain for a
  critical request, with its constants: keep endpoints with waiting < 50; among those,
  if the request names a LoRA adapter, prefer endpoints that have it loaded, else ones
  with a free adapter slot; then the least-queued band ``[min, min + (max-min)/N]``,
  then the lowest-KV band ``[min, min + (max-min)/N]``. If no endpoint has < 50 waiting:
  least-queued band, then "has the adapter or a free slot", then lowest-KV band. Pick at
  random among what is left. LoRA steps run only when the request's ``model`` is an
  adapter (it is loaded somewhere, or it is not a base model name, while some endpoint
  exports ``vllm:lora_requests_info``).
* ``least`` / ``most``: the lowest / highest band of ``target_metric`` (any metric name,
  summed over series; vLLM and SGLang names of queue, running and KV usage are aliases).

``rate_limit`` (0..1, default 1 = off): an endpoint whose share of this route's picks in
the last ``rate_limit_window`` seconds would exceed it is left out before the chain runs
(unless that leaves nothing).

Unknown data, decided with what is known, never silently turned off:

* An endpoint never scraped, or whose last good scrape is older than ``stale_after``, is
  *unknown*: it is left out while at least one candidate is known. Counted in
  ``stats["stale_endpoints"]`` and logged, rate-limited. When no candidate
  is known the request falls back to Envoy's LB, counted as ``metrics_unavailable``.
* A metric missing on some known endpoints: a filter on that metric runs over the
  endpoints that have it; if none has it, the filter is skipped. Counted per metric in
  ``stats["missing:<name>"]`` and logged, rate-limited.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Literal, Sequence

from ..core import BodyError, Decision, Endpoint, Fallback
from ..signals import EndpointMetrics, PickShare, ScrapeSpec
from ..signals.metrics import KV, WAITING
from ..telemetry import RateLimitedLog
from .base import Policy, PolicyConfig

log = logging.getLogger("ai_lb.endpoint_metrics")

# Higress / early GIE constant: below this many waiting requests, LoRA affinity is preferred.
QUEUEING_THRESHOLD_LORA = 50

_WAITING, _KV = WAITING[0], KV[0]


@dataclass(frozen=True)
class EndpointMetricsConfig(PolicyConfig):
    metric_policy: Literal["default", "least", "most"]
    target_metric: str = ""
    rate_limit: float = 1.0
    rate_limit_window: float = 10.0
    scrape_interval: float = 0.1
    scrape_timeout: float = 0.5
    stale_after: float = 1.0
    metrics_path: str = "/metrics"

    def validate(self) -> list[tuple[str, str]]:
        p: list[tuple[str, str]] = []
        if self.metric_policy in ("least", "most") and not self.target_metric:
            p.append(("target_metric", f"required when metric_policy is {self.metric_policy}"))
        if not 0 < self.rate_limit <= 1:
            p.append(("rate_limit", f"must be in (0, 1], got {self.rate_limit}"))
        if self.rate_limit_window <= 0:
            p.append(("rate_limit_window", "must be > 0 seconds"))
        if self.scrape_interval <= 0:
            p.append(("scrape_interval", "must be > 0 seconds"))
        if self.scrape_timeout <= 0:
            p.append(("scrape_timeout", "must be > 0 seconds"))
        if self.stale_after <= self.scrape_interval:
            p.append(("stale_after", f"must be longer than scrape_interval ({self.scrape_interval})"))
        if not self.metrics_path.startswith("/"):
            p.append(("metrics_path", "must start with /"))
        return p


Known = tuple[Endpoint, EndpointMetrics]


class EndpointMetricsPolicy(Policy):
    name = "endpoint_metrics"
    aliases = ("metrics_based",)
    Config = EndpointMetricsConfig

    def __init__(self, config: EndpointMetricsConfig, env) -> None:
        super().__init__(config, env)
        self.needs_body = config.metric_policy == "default"  # the request's LoRA adapter
        extra = (config.target_metric,) if config.target_metric else ()
        self.scraper = env.scrapes.subscribe(ScrapeSpec(
            interval=config.scrape_interval, timeout=config.scrape_timeout, stale_after=config.stale_after,
            path=config.metrics_path, extra=extra))
        self._log = RateLimitedLog(10.0)
        self._share = PickShare(config.rate_limit_window)
        self._route = env.route.name

    # -- lifecycle ---------------------------------------------------------------------
    def on_candidates(self, candidates: Sequence[Endpoint]) -> None:
        self.scraper.want(e.address for e in candidates)

    async def close(self) -> None:
        self.scraper.close()

    def _count(self, what: str, n: int = 1, fmt: str = "", *args) -> None:
        self.stats[what] = self.stats.get(what, 0) + n
        if fmt:
            self._log.warn(("endpoint_metrics", self._route, what), fmt, *args)

    # -- filters -----------------------------------------------------------------------
    def _with(self, pool: list[Known], metric: str) -> tuple[list[Known], list[float]]:
        """Endpoints of ``pool`` that have ``metric``, and their values; counts the rest."""
        have, vals = [], []
        for x in pool:
            v = x[1].get(metric)
            if v is not None:
                have.append(x)
                vals.append(v)
        if len(have) < len(pool):
            self._count(f"missing:{metric}", 1, "endpoint_metrics route=%s: metric %s missing on %s; "
                        "deciding without it there", self._route, metric,
                        ",".join(x[0].address for x in pool if x[1].get(metric) is None))
        return have, vals

    def _band(self, pool: list[Known], metric: str, lowest: bool = True) -> list[Known]:
        """The lowest (highest) band ``[min, min + (max-min)/N]`` of ``metric`` (Higress uses
        integer division for queue lengths; for integer counts the band is the same)."""
        have, vals = self._with(pool, metric)
        if not have:
            return pool
        lo, hi = min(vals), max(vals)
        width = (hi - lo) / len(pool)
        if lowest:
            top = lo + width
            return [x for x, v in zip(have, vals) if v <= top]
        bottom = hi - width
        return [x for x, v in zip(have, vals) if v >= bottom]

    def _low_queue(self, pool: list[Known]) -> list[Known]:
        have, vals = self._with(pool, _WAITING)
        if not have:
            return pool
        return [x for x, v in zip(have, vals) if v < QUEUEING_THRESHOLD_LORA]

    @staticmethod
    def _adapter(ctx, pool: list[Known]) -> str | None:
        """The request's LoRA adapter, if its ``model`` is one (needs LoRA metrics)."""
        if not any(m.lora is not None for _, m in pool):
            return None
        try:
            model = ctx.model
        except BodyError:
            return None
        if not model:
            return None
        base: set[str] = set()
        for _, m in pool:
            if m.lora is not None and model in m.lora.active:
                return model
            base.update(m.models)
        return model if base and model not in base else None

    def default_chain(self, pool: list[Known], adapter: str | None) -> list[Known]:
        low = self._low_queue(pool)
        if low:
            s = low
            if adapter is not None:
                aff = [x for x in s if x[1].lora is not None and adapter in x[1].lora.active]
                if aff:
                    s = aff
                else:
                    s = [x for x in s if x[1].lora is not None and len(x[1].lora.active) < x[1].lora.max_loras] or s
            s = self._band(s, _WAITING)
            return self._band(s, _KV)
        s = self._band(pool, _WAITING)
        if adapter is not None:
            s = [x for x in s if x[1].lora is not None and (adapter in x[1].lora.active
                                                            or len(x[1].lora.active) < x[1].lora.max_loras)] or s
        return self._band(s, _KV)

    # -- the decision ------------------------------------------------------------------
    async def pick(self, ctx, candidates: Sequence[Endpoint]) -> Decision:
        now = time.monotonic()
        sc = self.scraper
        pool: list[Known] = []
        unknown = 0
        for e in candidates:
            m = sc.get(e.address, now)
            if m is None:
                unknown += 1
            else:
                pool.append((e, m))
        if not pool:
            self._count("metrics_unavailable")
            return Fallback("metrics_unavailable")
        if unknown:
            self._count("stale_endpoints", unknown, "endpoint_metrics route=%s: %d of %d endpoints have no fresh "
                        "metrics (%s); deciding among the others", self._route, unknown, len(candidates),
                        ",".join(e.address for e in candidates if sc.get(e.address, now) is None))
        if self.config.rate_limit < 1:
            over = self._share.over(self.config.rate_limit, now)
            if over and len(pool) > 1:
                pool = [x for x in pool if x[0].address not in over] or pool
        cfg = self.config
        if cfg.metric_policy == "default":
            final = self.default_chain(pool, self._adapter(ctx, pool))
        else:
            final = self._band(pool, cfg.target_metric, lowest=cfg.metric_policy == "least")
        e = final[0][0] if len(final) == 1 else random.choice(final)[0]
        if cfg.rate_limit < 1:
            self._share.record(e.address, now)
        return e


POLICY = EndpointMetricsPolicy
