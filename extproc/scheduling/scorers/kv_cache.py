"""kv_cache: lower KV-cache usage scores higher (the GIE KV scorer; FlexLB's decode signal).

Score = 1 - usage, where usage is the scraped ``kv_cache_usage_perc`` plus the KV blocks
of picks assumed since that scrape (prompt tokens / block size, over the engine's block
count from ``vllm:cache_config_info``). Unknown usage scores 0.5. No parameters.
"""

from __future__ import annotations

from ..framework import Candidate, Scorer, Snapshot


class KvCache(Scorer):
    name = "kv_cache"
    uses_metrics = True

    def score(self, snap: Snapshot, cands: list[Candidate]) -> list[float]:
        return [0.5 if c.kv is None else 1.0 - c.kv for c in cands]


PLUGIN = KvCache
