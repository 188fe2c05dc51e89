"""Which endpoint holds which KV block, from the engines' own KV-cache events.

Keys are ai-lb's, not vLLM's. vLLM names a block by a hash over its parent's hash, its
token ids and extra keys, seeded per process (sha256 over pickle, hard to reproduce
outside Python and different per server unless ``PYTHONHASHSEED`` is pinned). So every
``BlockStored`` block is re-keyed here from the token ids the event carries:

    key_i = hash((key_{i-1}, salt_i, *tokens of block i))      key_{-1} = ROOT

(Python's hash of a tuple of ints: deterministic, ~0.3 µs per 32-token block). ``salt_i``
folds in the LoRA adapter's *name* and any other extra keys of the block (vLLM's
``cache_salt`` on block 0, multimodal hashes), so two adapters never share a block and a
request side that cannot name an extra key (an image) never matches past it. The request
side computes the same keys from its own tokenization (``chain_keys``).

Per endpoint a ``View`` maps vLLM's hash to our key: ``BlockRemoved`` carries only vLLM's
hash, and a ``BlockStored`` names its parent by vLLM's hash. The global map is key ->
bitmask of endpoint slots, so an endpoint's longest cached prefix for every candidate is
one walk over the prompt's keys (one dict lookup per block, whatever the fleet size).

Bounds: ``max_blocks`` in all, ``max_blocks_per_endpoint`` each; past them the storing
endpoint's oldest block is forgotten first (counted as ``overflow``). An endpoint's
entries are cleared when it restarts (``clear``) and dropped when it leaves (``drop``).
Memory per million blocks: docs/benchmarks.md ("KV-events index").
"""

from __future__ import annotations

import heapq
from hashlib import blake2b
from typing import Iterable, Sequence

ROOT = 0x6169_6C62_6B76_3031   # "ailbkv01": the chain's seed (no block before the first)
_SALTS_MAX = 4096


class View:
    """One endpoint's cached blocks as its events told them."""

    __slots__ = ("address", "slot", "bit", "blocks", "dups", "block_size", "stored", "removed")

    def __init__(self, address: str, slot: int) -> None:
        self.address = address
        self.slot = slot
        self.bit = 1 << slot
        self.blocks: dict = {}          # vLLM block hash -> our key (insertion order = age)
        self.dups: dict = {}            # vLLM hash -> extra copies (vLLM caches a block computed twice twice)
        self.block_size = 0             # from its BlockStored events (0: not seen yet)
        self.stored = 0
        self.removed = 0

    def __len__(self) -> int:
        return len(self.blocks)


class KvBlockIndex:
    def __init__(self, max_blocks: int = 4_000_000, max_blocks_per_endpoint: int = 1_000_000) -> None:
        self.max_blocks = max_blocks
        self.max_blocks_per_endpoint = max_blocks_per_endpoint
        self._holders: dict[int, int] = {}     # our key -> bitmask of the slots holding it
        self._views: dict[str, View] = {}
        self._free: list[int] = []             # released slots, lowest reused first
        self._next_slot = 0
        self._salts: dict[tuple, int] = {}
        self.total = 0                         # blocks over all views
        self.lora_names: dict[str, None] = {}  # adapters seen in events (bounded, insertion order)
        self.counts: dict[str, int] = {}       # orphan, unknown_removed, overflow, malformed ...

    # -- endpoints ------------------------------------------------------------------------
    def view(self, address: str) -> View:
        v = self._views.get(address)
        if v is None:
            slot = heapq.heappop(self._free) if self._free else self._next_slot
            if slot == self._next_slot:
                self._next_slot += 1
            v = self._views[address] = View(address, slot)
        return v

    def get(self, address: str) -> View | None:
        return self._views.get(address)

    def addresses(self) -> list[str]:
        return list(self._views)

    def views(self) -> list[View]:
        return list(self._views.values())

    def clear(self, address: str) -> int:
        """The endpoint's cache is empty now (AllBlocksCleared, a restart, a lost stream).
        Returns how many blocks were forgotten."""
        v = self._views.get(address)
        if v is None:
            return 0
        holders, keep = self._holders, ~v.bit
        for key in v.blocks.values():
            m = holders.get(key, 0) & keep
            if m:
                holders[key] = m
            else:
                holders.pop(key, None)
        n = len(v.blocks)
        self.total -= n
        v.blocks = {}
        v.dups = {}
        return n

    def drop(self, address: str) -> None:
        """The endpoint left the fleet: its entries and its slot go."""
        if address in self._views:
            self.clear(address)
            v = self._views.pop(address)
            heapq.heappush(self._free, v.slot)

    # -- events -----------------------------------------------------------------------------
    def salt(self, lora_name: str | None, extras: tuple = ()) -> int:
        """The stable int naming (adapter, extra keys) for a block's key (0: base model, none)."""
        if lora_name is None and not extras:
            return 0
        k = (lora_name, extras)
        s = self._salts.get(k)
        if s is None:
            if len(self._salts) >= _SALTS_MAX:
                self._salts.clear()
            h = blake2b(repr(k).encode("utf-8", "surrogatepass"), digest_size=8)
            s = self._salts[k] = int.from_bytes(h.digest(), "little") | 1
        return s

    def stored(self, v: View, hashes: Sequence, parent, tokens: Sequence[int], block_size: int,
               salts: Sequence[int] | int = 0) -> int:
        """Blocks ``hashes`` (consecutive, the first one's parent ``parent``, None for the
        first block of a prompt) now cached on ``v``. ``salts``: one for all, or one per
        block. Returns how many were applied (0 when the parent is unknown: an orphan)."""
        n = len(hashes)
        bs = block_size
        if n == 0 or bs <= 0 or len(tokens) < n * bs:
            self._count("malformed")
            return 0
        if parent is None:
            key = ROOT
        else:
            key = v.blocks.get(parent)
            if key is None:         # its parent was never seen (stored before we listened)
                self._count("orphan", n)
                return 0
        v.block_size = bs
        blocks, holders, bit = v.blocks, self._holders, v.bit
        per_block = not isinstance(salts, int)
        salt = 0 if per_block else salts
        added = 0
        for i in range(n):
            if per_block:
                salt = salts[i]
            key = hash((key, salt, *tokens[i * bs:(i + 1) * bs]))
            h = hashes[i]
            if h in blocks:
                v.dups[h] = v.dups.get(h, 0) + 1
                continue
            blocks[h] = key
            holders[key] = holders.get(key, 0) | bit
            added += 1
        v.stored += n
        self.total += added
        if len(blocks) > self.max_blocks_per_endpoint or self.total > self.max_blocks:
            self._shrink(v)
        return n

    def removed(self, v: View, h) -> bool:
        """vLLM evicted block ``h`` from ``v``. False when it was not known."""
        d = v.dups.get(h)
        if d:
            if d > 1:
                v.dups[h] = d - 1
            else:
                del v.dups[h]
            return True
        key = v.blocks.pop(h, None)
        if key is None:
            self._count("unknown_removed")
            return False
        self.total -= 1
        v.removed += 1
        m = self._holders.get(key, 0) & ~v.bit
        if m:
            self._holders[key] = m
        else:
            self._holders.pop(key, None)
        return True

    def saw_lora(self, name: str) -> None:
        if name not in self.lora_names:
            if len(self.lora_names) >= 1024:
                self.lora_names.pop(next(iter(self.lora_names)))
            self.lora_names[name] = None

    def _shrink(self, v: View) -> None:
        blocks, holders, keep = v.blocks, self._holders, ~v.bit
        n = 0
        while blocks and (len(blocks) > self.max_blocks_per_endpoint or self.total > self.max_blocks):
            h = next(iter(blocks))
            key = blocks.pop(h)
            v.dups.pop(h, None)
            m = holders.get(key, 0) & keep
            if m:
                holders[key] = m
            else:
                holders.pop(key, None)
            self.total -= 1
            n += 1
        self._count("overflow", n)

    def _count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    # -- reading ----------------------------------------------------------------------------
    def __len__(self) -> int:
        """Distinct blocks held anywhere."""
        return len(self._holders)

    def match(self, keys: Sequence[int]) -> dict[int, int]:
        """Slot -> how many leading blocks of ``keys`` it holds, for every slot holding at
        least the first (vLLM's rule: a prefix hit stops at the first missing block)."""
        holders = self._holders
        n = len(keys)
        if not n:
            return {}
        alive = holders.get(keys[0], 0)
        out: dict[int, int] = {}
        i = 1
        while alive and i < n:
            m = holders.get(keys[i], 0)
            lost = alive & ~m
            while lost:
                low = lost & -lost
                out[low.bit_length() - 1] = i
                lost ^= low
            alive &= m
            i += 1
        while alive:
            low = alive & -alive
            out[low.bit_length() - 1] = n
            alive ^= low
        return out

    def depths(self, keys: Sequence[int], addresses: Iterable[str]) -> dict[str, int]:
        """Address -> leading blocks of ``keys`` it holds (0 when none or unknown)."""
        by_slot = self.match(keys)
        views = self._views
        out = {}
        for a in addresses:
            v = views.get(a)
            out[a] = by_slot.get(v.slot, 0) if v is not None else 0
        return out


def chain_keys(tokens: Sequence[int], block_size: int, salt: int = 0, first_salt: int | None = None,
               parent: int = ROOT) -> list[int]:
    """The keys of every full block of ``tokens`` (the request side of ``stored``):
    ``salt`` on every block, ``first_salt`` (vLLM's ``cache_salt``) on block 0 if given."""
    out: list[int] = []
    key = parent
    bs = block_size
    append = out.append
    for i in range(len(tokens) // bs if bs > 0 else 0):
        s = first_salt if i == 0 and first_salt is not None else salt
        key = hash((key, s, *tokens[i * bs:(i + 1) * bs]))
        append(key)
    return out
