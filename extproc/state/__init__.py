"""Shared state behind small interfaces, each with a memory and a Redis implementation:
in-flight counts (``counts``: ``LocalCounts`` / ``redis_counts.RedisCounts``), the prefix
index (``prefix_index``), the bounded Redis connection (``redis_conn``, over the pipelined
client in ``resp``), and ``StateStores``, which shares them per store URL."""

from .counts import GlobalCounts, LocalCounts
from .inflight import LocalInflight
from .redis_settings import RedisSettings
from .stores import StateStores

__all__ = ["GlobalCounts", "LocalCounts", "LocalInflight", "RedisSettings", "StateStores"]
