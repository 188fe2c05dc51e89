"""Shared state behind small interfaces, each with a memory implementation.

Policies depend on these protocols, never on a backend, so a single instance runs with
in-memory state and a fleet shares the same interfaces through Redis.
"""

from .counts import GlobalCounts, MemoryCounts
from .inflight import InflightCounter, MemoryInflight

__all__ = ["GlobalCounts", "InflightCounter", "MemoryCounts", "MemoryInflight"]
