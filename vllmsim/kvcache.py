"""Paged KV cache with vLLM-v1-style automatic prefix caching.

What matters for load balancing is *which* prompts hit and *when* blocks get evicted,
so this mirrors vLLM's ``BlockPool``/``KVCacheManager`` bookkeeping (without tensors):

* block ``i`` of a prompt is identified by a chained hash of (hash of block ``i-1``,
  the block's token ids); only full blocks are hashed/cached;
* blocks are reference counted, so concurrent requests share a cached prefix;
* a block whose count drops to 0 keeps its contents and goes to the *tail* of an LRU
  free queue (a request's blocks are freed in reverse order, so a prefix's tail is
  evicted before its head); new allocations take from the *head* and evict the block's
  hash from the cache map at that moment;
* usage = 1 - free/total, where cached-but-unreferenced blocks count as free (this is
  what vLLM reports as ``kv_cache_usage_perc``).

Block hashes use Python's ``hash()`` of an int tuple: unlike ``hash(str)`` that is not
randomised per process, so it is stable across runs and cheap.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Iterable, Sequence


def block_hashes(token_ids: Sequence[int], block_size: int, extra: object = None) -> list[int]:
    """Chained hashes of every *full* block of ``token_ids``.

    ``extra`` (e.g. the LoRA adapter name) is mixed into the first block, as vLLM does
    with its "extra keys", so two adapters never share cached blocks.
    """
    # A stable seed: hash() of a string differs between processes (PYTHONHASHSEED), and an
    # oracle in another process must compute the same chain; tuples of ints hash stably.
    parent = int.from_bytes(hashlib.blake2b(f"vllmsim:{extra}".encode(), digest_size=8).digest(), "little") \
        if extra is not None else 0
    out: list[int] = []
    n_full = len(token_ids) // block_size
    for i in range(n_full):
        parent = hash((parent, tuple(token_ids[i * block_size:(i + 1) * block_size])))
        out.append(parent)
    return out


class KVCache:
    """Block allocator for one engine; requests hold lists of block ids."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        # LRU free queue: first item is evicted first.  Dict ops are O(1).
        self.free_queue: "OrderedDict[int, None]" = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.evictions = 0

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
        for _ in range(max(need, 0)):
            b, _unused = self.free_queue.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:
                # Reusing the block destroys its cached contents.
                if self.cached.get(h) == b:
                    del self.cached[h]
                self.block_hash[b] = None
                self.evictions += 1
            ref[b] = 1
            blocks.append(b)
        return True

    def cache_blocks(self, blocks: Sequence[int], hashes: Sequence[int], start: int, end: int) -> None:
        """Publish blocks ``start..end-1`` (now fully computed) in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        cached = self.cached
        for i in range(start, min(end, len(hashes), len(blocks))):
            h = hashes[i]
            if h in cached:
                continue  # an identical block computed concurrently stays uncached
            b = blocks[i]
            cached[h] = b
            self.block_hash[b] = h

    def free(self, blocks: Sequence[int]) -> None:
        """Drop a request's references; unreferenced blocks stay cached until evicted."""
        ref = self.ref
        fq = self.free_queue
        for b in reversed(blocks):
            ref[b] -= 1
            if ref[b] == 0:
                fq[b] = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (vLLM's /reset_prefix_cache); blocks stay allocated."""
        self.cached.clear()
        self.block_hash = [None] * self.num_blocks
