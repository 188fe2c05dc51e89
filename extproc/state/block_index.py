"""Which endpoints were sent which prompt blocks: a block-level prefix tree, bounded.

Each node of the tree is a chain key (``signals.prefix_blocks``: key *i* names the whole
prefix ``blocks[0..i]``, so a key is a path from the root and the map of keys *is* the
radix tree, with the path compressed into the key). A node records the endpoints that
were sent that prefix. ``depth(keys, endpoint)`` is how many leading blocks of a prompt
the endpoint holds: every endpoint's match counts, not only the deepest (FastDeploy
scores only the deepest match).

Prefix closure: whenever an endpoint holds node *i*, it holds every node before it. A
chain is recorded deepest first, so its shallow nodes are always the more recently used,
and eviction (least recently used first) removes deep nodes before their ancestors. So
``depth`` is a binary search over the chain, not a walk.

Bounds: at most ``max_blocks`` nodes (least recently used evicted first), and nodes
unused for ``ttl`` seconds are dropped by ``expire`` (FastDeploy's
``eviction-duration-mins``, swept every ``eviction-interval-secs`` by the policy). An
endpoint that left the fleet is never asked about again, so its entries simply age out.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Collection, Iterable, Sequence


class BlockIndex:
    def __init__(self, max_blocks: int = 500_000, ttl: float = 1800.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_blocks = max_blocks
        self.ttl = ttl
        self._clock = clock
        # key -> (holders, last used): holders is one address (the common case: a str,
        # no container) or a frozenset of addresses.
        self._nodes: OrderedDict[int, tuple] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._nodes)

    # -- reading -------------------------------------------------------------------------
    def holders(self, key: int) -> Collection[str]:
        v = self._nodes.get(key)
        if v is None:
            return ()
        h = v[0]
        return (h,) if isinstance(h, str) else h

    def _holds(self, key: int, address: str) -> bool:
        v = self._nodes.get(key)
        if v is None:
            return False
        h = v[0]
        return h == address if isinstance(h, str) else address in h

    def deepest(self, keys: Sequence[int]) -> int:
        """How many leading blocks of ``keys`` any endpoint holds."""
        nodes = self._nodes
        lo, hi = 0, len(keys)          # invariant: keys[:lo] held (by someone), keys[hi:] not
        while lo < hi:
            mid = (lo + hi) // 2
            if int(keys[mid]) in nodes:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def depth(self, keys: Sequence[int], address: str, upper: int | None = None) -> int:
        """How many leading blocks of ``keys`` ``address`` holds (at most ``upper``)."""
        hi = len(keys) if upper is None else upper
        if hi == 0 or not self._holds(int(keys[0]), address):
            return 0
        if self._holds(int(keys[hi - 1]), address):
            return hi
        lo = 1
        hi -= 1
        while lo < hi:
            mid = (lo + hi) // 2
            if self._holds(int(keys[mid]), address):
                lo = mid + 1
            else:
                hi = mid
        return lo

    # -- writing -------------------------------------------------------------------------
    def record(self, keys: Iterable[int], address: str) -> None:
        """``address`` was sent the prompt whose chain is ``keys`` (shallowest first)."""
        nodes = self._nodes
        now = self._clock()
        chain = keys.tolist() if hasattr(keys, "tolist") else list(keys)
        for k in reversed(chain):      # deepest first: ancestors end up the more recent
            v = nodes.get(k)
            if v is None:
                nodes[k] = (address, now)
                continue
            h = v[0]
            if isinstance(h, str):
                if h != address:
                    h = frozenset((h, address))
            elif address not in h:
                h = h | {address}
            nodes[k] = (h, now)
            nodes.move_to_end(k)
        over = len(nodes) - self.max_blocks
        if over > 0:
            for _ in range(over):
                nodes.popitem(last=False)
            self.evicted += over

    def expire(self) -> int:
        """Drop nodes unused for ``ttl``, oldest first (O(dropped)). Returns how many."""
        nodes = self._nodes
        horizon = self._clock() - self.ttl
        n = 0
        while nodes:
            k, (h, t) = next(iter(nodes.items()))
            if t >= horizon:
                break
            nodes.popitem(last=False)
            n += 1
        self.evicted += n
        return n
