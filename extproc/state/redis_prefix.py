"""``prefix_cache`` over Redis in one round trip: match, load guard, pick, count, record.

Higress's semantics, in one Lua script (atomic, one call on the request path):

1. walk the request's chain of prefix keys while each exists and names a healthy
   candidate, refreshing their TTL: the deepest match wins;
2. if its endpoint has more than ``abs`` requests in flight above the least loaded one
   and more than ``rel`` times as many, the match is ignored (the load guard);
3. no usable match: the least loaded candidate (ties at random), from the same shared
   in-flight counts as ``global_least_request``;
4. count one more on the chosen endpoint (this instance's lease and share, exactly as
   ``RedisCounts`` does, so releases and crash leases work the same);
5. write the chain after the match (a stale key included) with the chosen endpoint.

Every key carries the pool's hash tag (``redis_keys``), so the script is Redis Cluster
safe. When Redis is slow or down the caller decides with its local index instead.
"""

from __future__ import annotations

import random
from typing import Sequence

from .redis_counts import _REAP, RedisCounts
from .redis_keys import count_keys, prefix_key

# KEYS: total, by_inst, leases, chain keys... ARGV: instance, lease_ms, random, ttl, abs, rel,
# then the healthy candidates.
PICK_PREFIX = _REAP + """
local now = now_ms()
reap(now)
local inst = ARGV[1]
redis.call('HSET', KEYS[3], inst, now + tonumber(ARGV[2]))
local ttl = tonumber(ARGV[4])
local healthy, cands = {}, {}
for i = 7, #ARGV do healthy[ARGV[i]] = true; cands[#cands + 1] = ARGV[i] end
local depth, host = 0, false
for i = 4, #KEYS do
  local h = redis.call('GET', KEYS[i])
  if not h or not healthy[h] then break end
  redis.call('EXPIRE', KEYS[i], ttl)
  depth, host = i - 3, h
end
local vals = redis.call('HMGET', KEYS[1], unpack(cands))
local count, low, ties = {}, nil, {}
for i, c in ipairs(cands) do
  local n = tonumber(vals[i]) or 0
  count[c] = n
  if low == nil or n < low then low = n; ties = {c} elseif n == low then ties[#ties + 1] = c end
end
local imbalanced = 0
if host and #cands > 1 then
  local mine = count[host]
  if mine - low > tonumber(ARGV[5]) and mine > tonumber(ARGV[6]) * low then
    host, depth, imbalanced = false, 0, 1
  end
end
if not host then host = ties[(tonumber(ARGV[3]) % #ties) + 1] end
redis.call('HINCRBY', KEYS[1], host, 1)
redis.call('HINCRBY', KEYS[2], inst .. '|' .. host, 1)
for i = depth + 4, #KEYS do redis.call('SET', KEYS[i], host, 'EX', ttl) end
return {host, depth, imbalanced}
"""


class RedisPrefixPick:
    def __init__(self, counts: RedisCounts) -> None:
        self.counts = counts
        self._script = counts.conn.client.register_script(PICK_PREFIX)

    async def pick(self, pool: str, chain: Sequence[str], healthy: Sequence[str], ttl: float,
                   abs_threshold: float, rel_threshold: float) -> tuple[str, int, bool]:
        """(endpoint, matched depth, load guard fired); raises ``RedisUnavailable``."""
        c = self.counts
        c.pools.add(pool)
        keys = [*count_keys(pool), *(prefix_key(pool, k) for k in chain)]
        args = [c.instance, c.lease_ms, random.getrandbits(30), max(1, int(ttl)), abs_threshold, rel_threshold,
                *healthy]
        host, depth, imbalanced = await c.conn.call(lambda: self._script(keys=keys, args=args))
        host = host.decode() if isinstance(host, bytes) else host
        c._book(pool, host, 1)
        return host, int(depth), bool(int(imbalanced))
