"""Paged KV cache with vLLM-v1-style automatic prefix caching.

What matters for load balancing is *which* prompts hit and *when* blocks get evicted,
so this mirrors vLLM's ``BlockPool``/``KVCacheManager`` bookkeeping (without tensors):

* block ``i`` of a prompt is identified by vLLM's chained hash (``blockhash.py``); only
  full blocks are hashed/cached;
* blocks are reference counted, so concurrent requests share a cached prefix;
* a block whose count drops to 0 keeps its contents and goes to the *tail* of an LRU
  free queue (a request's blocks are freed in reverse order, so a prefix's tail is
  evicted before its head); new allocations take from the *head* and evict the block's
  hash from the cache map at that moment;
* usage = 1 - free/total, where cached-but-unreferenced blocks count as free (this is
  what vLLM reports as ``kv_cache_usage_perc``).

With ``record_events`` the cache also queues vLLM's KV events (``BlockStored`` when
blocks enter the prefix cache, ``BlockRemoved`` when a cached block is evicted,
``AllBlocksCleared`` on reset) for the engine to publish once per step.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable, Sequence

from .blockhash import block_hashes, extra_keys_for

__all__ = ["KVCache", "block_hashes"]

MEDIUM = "GPU"
SPEC_KIND = "full_attention"


class KVCache:
    """Block allocator for one engine; requests hold lists of block ids."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 record_events: bool = False) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        # LRU free queue: first item is evicted first.  Dict ops are O(1).
        self.free_queue: "OrderedDict[int, None]" = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.evictions = 0
        # Pending KV events (vLLM's event maps), or None when nobody listens.
        self.events: list[dict[str, Any]] | None = [] if (record_events and enable_prefix_caching) else None

    # ------------------------------------------------------------------ queries
    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def usage(self) -> float:
        return 1.0 - len(self.free_queue) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Block ids of the longest cached prefix (at most ``max_blocks`` blocks)."""
        if not self.enable_prefix_caching:
            return []
        out: list[int] = []
        cached = self.cached
        for h in hashes[:max_blocks]:
            bid = cached.get(h)
            if bid is None:
                break
            out.append(bid)
        return out

    # --------------------------------------------------------------- allocation
    def allocate(self, blocks: list[int], num_tokens: int, computed: Iterable[int] = ()) -> bool:
        """Grow ``blocks`` (a request's block table) to hold ``num_tokens`` tokens.

        ``computed`` are prefix-cache hits to take a reference on first.  Returns False
        and changes nothing when the cache cannot hold it (the caller waits or preempts).
        """
        computed = list(computed)
        need = self.blocks_for(num_tokens) - len(blocks) - len(computed)
        touched_free = sum(1 for b in computed if self.ref[b] == 0)
        if need > len(self.free_queue) - touched_free:
            return False
        ref = self.ref
        for b in computed:
            if ref[b] == 0:
                del self.free_queue[b]
            ref[b] += 1
            blocks.append(b)
        events = self.events
        for _ in range(max(need, 0)):
            b, _unused = self.free_queue.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:
                # Reusing the block destroys its cached contents.
                if self.cached.get(h) == b:
                    del self.cached[h]
                    if events is not None:
                        events.append({"type": "BlockRemoved", "block_hashes": [h],
                                       "medium": MEDIUM, "group_idx": 0})
                self.block_hash[b] = None
                self.evictions += 1
            ref[b] = 1
            blocks.append(b)
        return True

    def cache_blocks(self, blocks: Sequence[int], hashes: Sequence[int], start: int, end: int,
                     token_ids: Sequence[int] = (), lora: tuple[int, str] | None = None) -> None:
        """Publish blocks ``start..end-1`` (now fully computed) in the prefix cache.

        ``token_ids``/``lora`` (adapter id, name) only describe the ``BlockStored`` event.
        """
        if not self.enable_prefix_caching:
            return
        cached = self.cached
        run_start = -1
        stop = min(end, len(hashes), len(blocks))
        for i in range(start, stop):
            h = hashes[i]
            if h in cached:
                # An identical block computed concurrently stays uncached.
                if run_start >= 0:
                    self._stored(hashes, run_start, i, token_ids, lora)
                    run_start = -1
                continue
            b = blocks[i]
            cached[h] = b
            self.block_hash[b] = h
            if run_start < 0:
                run_start = i
        if run_start >= 0:
            self._stored(hashes, run_start, stop, token_ids, lora)

    def _stored(self, hashes: Sequence[int], start: int, end: int, token_ids: Sequence[int],
                lora: tuple[int, str] | None) -> None:
        if self.events is None:
            return
        bs = self.block_size
        keys = extra_keys_for(lora[1] if lora else None)
        self.events.append({
            "type": "BlockStored", "block_hashes": list(hashes[start:end]),
            "parent_block_hash": hashes[start - 1] if start > 0 else None,
            "token_ids": list(token_ids[start * bs:end * bs]), "block_size": bs,
            "lora_id": lora[0] if lora else None, "medium": MEDIUM,
            "lora_name": lora[1] if lora else None,
            "extra_keys": [list(keys) if keys else None] * (end - start),
            "group_idx": 0, "kv_cache_spec_kind": SPEC_KIND,
        })

    def free(self, blocks: Sequence[int]) -> None:
        """Drop a request's references; unreferenced blocks stay cached until evicted."""
        ref = self.ref
        fq = self.free_queue
        for b in reversed(blocks):
            ref[b] -= 1
            if ref[b] == 0:
                fq[b] = None

    def reset_prefix_cache(self) -> bool:
        """vLLM's ``BlockPool.reset_prefix_cache``: forget every cached hash.

        Like vLLM it refuses (returns False, nothing changes) while any block is in use.
        """
        if len(self.free_queue) != self.num_blocks:
            return False
        self.cached.clear()
        self.block_hash = [None] * self.num_blocks
        if self.events is not None:
            self.events.append({"type": "AllBlocksCleared"})
        return True

    def take_events(self) -> list[dict[str, Any]]:
        events = self.events
        if not events:
            return []
        self.events = []
        return events
