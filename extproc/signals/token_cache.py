"""Tokenize long prompts once: reuse the tokens of a text prefix seen before.

A multi-turn chat sends its whole history every turn; tokenizing it again each time
costs ~1 µs per token. So every tokenized text is kept (bounded) with its tokens'
character offsets, indexed by chain keys of its 64-character chunks (key *j* names the
text's first *j* chunks, ``prefix_blocks.chain_keys`` over the text's code points).
A new text looks up its deepest chunk key that an earlier text shares, keeps that
text's tokens up to a little before the shared part ends, and tokenizes only the rest,
starting a few tokens earlier so both tokenizations can be seen to agree:

* the new part is tokenized from the start of the kept region's 8th-last token;
* the splice point is the first token where the new tokenization and the kept one start
  at the same character and agree on at least 4 tokens up to the end of the kept region
  (32 characters before the shared text ends, so no look-ahead crosses it);
* no such point (a tokenizer whose tokens depend on far context): the whole text is
  tokenized again, counted in ``stats["full"]``.

The result is the tokenizer's own output for every tokenizer whose tokens do not depend
on text more than 32 characters ahead (pre-tokenizer-based BPE, WordPiece, fixed-length
pieces); the tests compare it with whole-text tokenization on multi-turn chats.
Bounds: ``max_tokens`` tokens kept in all, least recently used texts dropped first.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict
from typing import Callable

from .prefix_blocks import chain_keys

CHUNK = 64          # characters per chunk key
GUARD = 32          # characters before the end of the shared text that a kept token must end by
OVERLAP = 8         # tokens re-tokenized before the kept region's end
SYNC = 4            # tokens both tokenizations must agree on
_SEED = 0x746F6B63  # "tokc"

Encoded = tuple[list[int], list[int], list[int]]   # ids, start offsets, end offsets (characters)


class _Entry:
    __slots__ = ("ids", "starts", "ends", "keys")

    def __init__(self, ids: list[int], starts: list[int], ends: list[int], keys: list[int]) -> None:
        self.ids, self.starts, self.ends, self.keys = ids, starts, ends, keys


def text_keys(text: str) -> list[int]:
    return chain_keys(text.encode("utf-32-le", "surrogatepass"), CHUNK * 4, _SEED).tolist()


class TokenCache:
    def __init__(self, encode: Callable[[str], Encoded], max_tokens: int = 2_000_000, min_reuse: int = 256) -> None:
        self._encode = encode
        self.max_tokens = max_tokens
        self.min_reuse = min_reuse      # characters: shorter shared prefixes are not worth a lookup
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._by_key: dict[int, _Entry] = {}
        self.tokens = 0
        self.stats = {"hit": 0, "miss": 0, "full": 0, "reused_tokens": 0, "encoded_chars": 0}

    def __len__(self) -> int:
        return len(self._entries)

    def encode(self, text: str) -> list[int]:
        keys = text_keys(text) if len(text) >= CHUNK else []
        got = self._lookup(keys)
        if got is not None:
            e, j = got
            out = self._splice(text, e, j * CHUNK)
            if out is not None:
                self.stats["hit"] += 1
                self._store(keys, *out)
                return out[0]
            self.stats["full"] += 1
        else:
            self.stats["miss"] += 1
        enc = self._encode(text)
        self.stats["encoded_chars"] += len(text)
        self._store(keys, *enc)
        return enc[0]

    def _lookup(self, keys: list[int]) -> tuple[_Entry, int] | None:
        by = self._by_key
        for j in range(len(keys), 0, -1):
            if j * CHUNK < self.min_reuse:
                return None
            e = by.get(keys[j - 1])
            if e is not None:
                return e, j
        return None

    def _splice(self, text: str, e: _Entry, limit: int) -> Encoded | None:
        last = bisect_right(e.ends, limit - GUARD) - 1         # the last kept token ends by here
        if last < OVERLAP + SYNC:
            return None
        first = last - OVERLAP
        p = e.starts[first]
        ids, starts, ends = self._encode(text[p:])
        self.stats["encoded_chars"] += len(text) - p
        starts = [s + p for s in starts]
        ends = [x + p for x in ends]
        at = {}
        for k, s in enumerate(starts):
            at.setdefault(s, k)
        for q in range(first, last - SYNC + 2):
            k = at.get(e.starts[q])
            if k is None:
                continue
            n = last + 1 - q
            if ids[k:k + n] == e.ids[q:last + 1] and ends[k:k + n] == e.ends[q:last + 1]:
                self.stats["reused_tokens"] += q
                return e.ids[:q] + ids[k:], e.starts[:q] + starts[k:], e.ends[:q] + ends[k:]
        return None

    def _store(self, keys: list[int], ids: list[int], starts: list[int], ends: list[int]) -> None:
        if not keys or len(ids) > self.max_tokens:
            return
        old = self._by_key.get(keys[-1])
        if old is not None and len(old.keys) == len(keys) and old.keys[-1] == keys[-1]:
            self._entries.move_to_end(id(old))   # the same text again
            return
        e = _Entry(ids, starts, ends, keys)
        self._entries[id(e)] = e
        by = self._by_key
        for k in keys:
            by[k] = e                             # the newest text answers for a shared prefix
        self.tokens += len(ids)
        while self.tokens > self.max_tokens and self._entries:
            _, x = self._entries.popitem(last=False)
            self.tokens -= len(x.ids)
            for k in x.keys:
                if by.get(k) is x:
                    del by[k]
