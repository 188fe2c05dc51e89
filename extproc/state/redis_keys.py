"""Redis key layout shared by the stores: one hash tag per pool (route + cluster), so every
key one decision touches lives in one Redis Cluster slot and one script may use them all."""

from __future__ import annotations


def pool_tag(pool: str) -> str:
    # Braces inside the name would end the hash tag early (and split the slot).
    return "{ailb:" + pool.replace("}", "_").replace("{", "_") + "}"


def count_keys(pool: str) -> tuple[str, str, str]:
    """In-flight counts: total per endpoint, this instance's shares, instance leases."""
    tag = pool_tag(pool)
    return f"{tag}:total", f"{tag}:by_inst", f"{tag}:leases"


def prefix_key(pool: str, key: str) -> str:
    """One chained prefix key of ``prefix_cache`` (value: the endpoint that served it)."""
    return f"{pool_tag(pool)}:pc:{key}"
