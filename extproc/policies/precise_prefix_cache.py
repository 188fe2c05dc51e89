"""precise_prefix_cache: route to the endpoint that really holds the prompt's prefix, weighed
against its load (llm-d's precise prefix-cache scheduling, FlexLB's cache server).

The engines publish every KV block they store or evict (vLLM ``--kv-events-config``); the
``precise_prefix`` scorer turns that stream into each endpoint's true cached share of the
prompt, tokenized with the model's own tokenizer and chat template. Composition (the
weights are llm-d's precise-prefix-cache defaults):

    healthy -> precise_prefix x 3 + queue x 2 + kv_cache x 2 -> max_score

``queue`` and ``kv_cache`` read the scraped queue and KV usage with assumed load (the
picks since the last scrape), so a burst does not pile onto the holder of a hot prefix.
Where an endpoint's events are missing or stale, its prefix score is the approximate
block-level match (what ai-lb sent there), counted in ``fallback:<reason>`` events.

``lb_config``::

    tokenizer: /models/llama-3-8b          # tokenizer.json + tokenizer_config.json
    kv_events: {endpoint: "tcp://{host}:5557", replay_endpoint: "tcp://{host}:5558"}
    block_size: 0                          # 0: the engine's (events, cache_config_info)
    prefix_weight: 3, queue_weight: 2, kv_cache_weight: 2
    pending: true, lora_adapters: [], content_format: auto
    # + scrape settings, max_candidates, observe_errors

See docs/policies/precise_prefix.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..scheduling import spec
from ..signals.kv_events import KvEventsSpec
from .scheduler import MetricsAwareConfig, ScheduledPolicy


@dataclass(frozen=True)
class PrecisePrefixCacheConfig(MetricsAwareConfig):
    tokenizer: str = ""
    kv_events: KvEventsSpec = KvEventsSpec()
    block_size: int = 0
    content_format: Literal["auto", "string", "openai"] = "auto"
    lora_adapters: tuple[str, ...] = ()
    prefix_weight: float = 3.0
    queue_weight: float = 2.0
    kv_cache_weight: float = 2.0
    pending: bool = True                # requests in flight count where they went
    max_blocks: int = 500_000           # the approximate (fallback) index
    cache_tokens: int = 2_000_000       # tokenizations kept for reuse, in tokens

    def scorer_config(self):
        from ..scheduling.scorers.precise_prefix import PrecisePrefixConfig

        return PrecisePrefixConfig(tokenizer=self.tokenizer, kv_events=self.kv_events, block_size=self.block_size,
                                   content_format=self.content_format, lora_adapters=self.lora_adapters,
                                   pending=self.pending, max_blocks=self.max_blocks,
                                   cache_tokens=self.cache_tokens)

    def validate(self) -> list[tuple[str, str]]:
        p = super().validate()
        for f in ("prefix_weight", "queue_weight", "kv_cache_weight"):
            if getattr(self, f) < 0:
                p.append((f, "must be >= 0"))
        if self.max_blocks < 1:
            p.append(("max_blocks", "must be >= 1"))
        return p + [(f, m) for f, m in self.scorer_config().validate() if f not in ("max_blocks",)]


class PrecisePrefixCache(ScheduledPolicy):
    name = "precise_prefix_cache"
    Config = PrecisePrefixCacheConfig

    def __init__(self, config: PrecisePrefixCacheConfig, env) -> None:
        super().__init__(config, env)
        self.precise = next((p for p in self.profile.plugins if p.name == "precise_prefix"), None)
        self._stats_at = 0.0

    def profile_specs(self, c: PrecisePrefixCacheConfig):
        from ..scheduling.plugins import PluginSpec

        scorers = [PluginSpec("scorer", "precise_prefix", c.scorer_config(), c.prefix_weight),
                   spec("scorer", "queue", weight=c.queue_weight),
                   spec("scorer", "kv_cache", weight=c.kv_cache_weight)]
        return [spec("filter", "healthy")], scorers, spec("picker", "max_score")

    def decide(self, ctx, candidates):
        d = super().decide(ctx, candidates)
        p = self.precise
        if p is not None:
            st = self.stats
            for k, n in p.take_counts().items():      # what the pick saw: precise_hit, precise_miss, fallback_pick
                st[k] = st.get(k, 0) + n
            now = self.env.load.clock()
            if now >= self._stats_at and p.hub is not None:   # the streams' own counts, at most once a second
                self._stats_at = now + 1.0
                for k, n in p.hub.stats().items():
                    st[f"events:{k}"] = n
        return d


POLICY = PrecisePrefixCache
