"""One request's prompt blocks against the block index, computed once per decision.

Shared by every plugin that needs "how much of this prompt does endpoint X hold": the
prefix scorer (hit ratio) and the TTFT estimate (uncached tokens). The chain keys are
hashed once (``signals.prefix_blocks``); each endpoint's depth is a binary search,
done only for the endpoints a plugin asks about.
"""

from __future__ import annotations

import numpy as np

from ..core import BodyError, RequestContext
from ..signals.prefix_blocks import request_blocks
from ..state.block_index import BlockIndex


class PrefixMatch:
    __slots__ = ("index", "keys", "total", "deepest", "_depth", "block_bytes")

    def __init__(self, ctx: RequestContext, index: BlockIndex, block_bytes: int) -> None:
        self.index = index
        self.block_bytes = block_bytes
        try:
            self.keys = request_blocks(ctx.json(), block_bytes)
        except BodyError:
            self.keys = np.empty(0, dtype=np.uint64)
        self.total = len(self.keys)
        self.deepest = index.deepest(self.keys) if self.total else 0
        self._depth: dict[str, int] = {}

    def depth(self, address: str) -> int:
        """Leading blocks of the prompt that ``address`` holds."""
        d = self._depth.get(address)
        if d is None:
            d = self._depth[address] = self.index.depth(self.keys, address, self.deepest) if self.deepest else 0
        return d

    def ratio(self, address: str) -> float:
        return self.depth(address) / self.total if self.total else 0.0

    def holders_deepest(self) -> tuple[str, ...]:
        """The endpoints that hold the longest prefix anyone holds."""
        if not self.deepest:
            return ()
        return tuple(self.index.holders(int(self.keys[self.deepest - 1])))
