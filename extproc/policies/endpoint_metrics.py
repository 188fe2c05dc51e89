"""endpoint_metrics (alias ``metrics_based``): route by the model servers' own /metrics.

Compatible with Higress ``ai-load-balancer``'s policy of the same name (same ``lb_config``
field names and defaults), minus its defects (see docs/policies/endpoint_metrics.md).
A scheduling-framework composition:

    fresh_metrics -> healthy -> pick_share (rate_limit) -> higress_chain | band(target_metric) -> random

``metric_policy``:

* ``default``: Higress's (= early Gateway API Inference Extension) filter chain for a
  critical request (``scheduling/filters/higress_chain.py``): waiting < 50, LoRA
  affinity, least-queued band, lowest-KV band; random among what is left.
* ``least`` / ``most``: the lowest / highest band of ``target_metric`` (any metric name,
  summed over series; vLLM and SGLang names of queue, running and KV usage are aliases).

What makes it stop losing to round robin: queue and KV are read with the load *assumed*
for the picks made since each endpoint's last scrape (``extproc.signals.load``). Higress
decides on a scrape that is ~100 ms old, so every decision in that window sees the same
idle-looking endpoint and herds onto it.

``rate_limit`` (0..1, default 1 = off): an endpoint whose share of this route's picks in
the last ``rate_limit_window`` seconds would exceed it is left out before the chain runs
(unless that leaves nothing).

Unknown data, decided with what is known, never silently turned off:

* An endpoint never scraped, or whose last good scrape is older than ``stale_after``, is
  *unknown*: it is left out while at least one candidate is known. Counted in
  ``stats["stale_endpoints"]`` and logged, rate-limited. When no candidate is known the
  request falls back to Envoy's LB, counted as ``metrics_unavailable``.
* A metric missing on some known endpoints: a filter on that metric runs over the
  endpoints that have it; if none has it, the filter is skipped. Counted per metric in
  ``stats["missing:<name>"]`` and logged, rate-limited.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..scheduling import spec
from .scheduler import MetricsAwareConfig, ScheduledPolicy


@dataclass(frozen=True, kw_only=True)
class EndpointMetricsConfig(MetricsAwareConfig):
    metric_policy: Literal["default", "least", "most"]
    target_metric: str = ""
    rate_limit: float = 1.0
    rate_limit_window: float = 10.0

    def validate(self) -> list[tuple[str, str]]:
        p = super().validate()
        if self.metric_policy in ("least", "most") and not self.target_metric:
            p.append(("target_metric", f"required when metric_policy is {self.metric_policy}"))
        if not 0 < self.rate_limit <= 1:
            p.append(("rate_limit", f"must be in (0, 1], got {self.rate_limit}"))
        if self.rate_limit_window <= 0:
            p.append(("rate_limit_window", "must be > 0 seconds"))
        return p


class EndpointMetricsPolicy(ScheduledPolicy):
    name = "endpoint_metrics"
    aliases = ("metrics_based",)
    Config = EndpointMetricsConfig
    fallback_reason = "metrics_unavailable"

    def __init__(self, config: EndpointMetricsConfig, env) -> None:
        super().__init__(config, env)
        self.needs_body = config.metric_policy == "default"  # the request's LoRA adapter
        self._route = env.route.name

    def extra_metrics(self, config: EndpointMetricsConfig) -> tuple[str, ...]:
        return (config.target_metric,) if config.target_metric else ()

    def profile_specs(self, config: EndpointMetricsConfig):
        if config.metric_policy == "default":
            choose = spec("filter", "higress_chain")
        else:
            choose = spec("filter", "band", metric=config.target_metric, highest=config.metric_policy == "most")
        filters = [spec("filter", "fresh_metrics"), spec("filter", "healthy"),
                   spec("filter", "pick_share", limit=config.rate_limit, window=config.rate_limit_window), choose]
        return filters, [], spec("picker", "max_score")  # no scorer: random among what the chain kept

    def noticed(self, events: dict[str, int]) -> None:
        for what, n in events.items():
            self._log.warn(("endpoint_metrics", self._route, what), "endpoint_metrics route=%s: %s x%d (%d so far); "
                           "deciding with what is known", self._route, what, n, self.stats.get(what, 0))


POLICY = EndpointMetricsPolicy
