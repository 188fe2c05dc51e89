"""One waiting line across ai-lb replicas, through Redis (the engine FastDeploy's global
scheduler uses too).

Per route (its pool's hash tag, so one Redis Cluster slot): a sorted set of waiting
requests, scored ``class rank x 10^13 + arrival ms`` (Redis's clock, the same for every
replica), so the order is strict priority, then arrival, whichever replica holds the
request; and the cluster-wide slots in use per endpoint, kept like the in-flight counts
of ``state/redis_counts.py`` (per-instance shares and leases: a replica that dies gives
its slots back when its lease expires).

``claim`` is one script, atomic: a request may take a slot only if nobody waits ahead of
it anywhere (a newcomer: the line is empty; a waiter: it is the line's head); the slot
is the endpoint with the fewest slots in use among those below ``max_inflight``. A
newcomer that cannot have a slot joins the line in the same call. Heads whose replica's
lease expired, or whose deadline passed, are dropped on the way. So no slot is given
twice, and the oldest waiting request anywhere gets the next free one.
"""

from __future__ import annotations

import random
from typing import Sequence

from ..state.redis_counts import _REAP, RedisCounts
from ..state.redis_keys import count_keys, pool_tag

# KEYS: slots total, by_inst, leases, line, line sequence. ARGV: instance, lease_ms, member ("" = a newcomer),
# rank, max_wait_ms, max_inflight, random, candidates...
CLAIM = _REAP + """
local now = now_ms()
reap(now)
local inst = ARGV[1]
redis.call('HSET', KEYS[3], inst, now + tonumber(ARGV[2]))
local member = ARGV[3]
-- drop heads that can no longer be served: their replica is gone or their deadline passed
while true do
  local head = redis.call('ZRANGE', KEYS[4], 0, 0)[1]
  if not head then break end
  local owner, deadline = string.match(head, '^([^:]+):[^:]+:(%d+)$')
  if owner and (tonumber(deadline) < now or not redis.call('HGET', KEYS[3], owner)) then
    redis.call('ZREM', KEYS[4], head)
  else break end
end
local head = redis.call('ZRANGE', KEYS[4], 0, 0)[1]
local mine = member ~= ''
local may = (not mine and not head) or (mine and head == member)
if may then
  local cands = {}
  for i = 8, #ARGV do cands[#cands + 1] = ARGV[i] end
  local vals = redis.call('HMGET', KEYS[1], unpack(cands))
  local cap = tonumber(ARGV[6])
  local low, best = nil, {}
  for i, c in ipairs(cands) do
    local n = tonumber(vals[i]) or 0
    if n < cap then
      if low == nil or n < low then low = n; best = {c} elseif n == low then best[#best + 1] = c end
    end
  end
  if low ~= nil then
    local ep = best[(tonumber(ARGV[7]) % #best) + 1]
    if mine then redis.call('ZREM', KEYS[4], member) end
    redis.call('HINCRBY', KEYS[1], ep, 1)
    redis.call('HINCRBY', KEYS[2], inst .. '|' .. ep, 1)
    return {1, ep}
  end
end
if not mine then
  member = inst .. ':' .. redis.call('INCR', KEYS[5]) .. ':' .. (now + tonumber(ARGV[5]))
  redis.call('ZADD', KEYS[4], tonumber(ARGV[4]) * 10000000000000 + now, member)
  return {0, member}
end
return {0, head or ''}
"""


class RedisLine:
    """The shared line of one route: ``claim`` on the request path, ``leave`` when a waiter
    gives up, slots released through the shared counts."""

    def __init__(self, counts: RedisCounts, pool: str) -> None:
        self.counts = counts
        self.pool = pool + "|queue"            # its own slot counts, apart from the policies'
        self.key = f"{pool_tag(self.pool)}:line"
        self.seq_key = f"{pool_tag(self.pool)}:line_seq"
        self._claim = counts.conn.client.register_script(CLAIM)

    async def claim(self, member: str, rank: int, max_wait: float, max_inflight: int,
                    candidates: Sequence[str]) -> tuple[str | None, str]:
        """(endpoint with a slot now, or None; and then: a newcomer's member in the line, or
        the line's head for a waiter that is not it). Raises ``RedisUnavailable``."""
        c = self.counts
        c.pools.add(self.pool)
        keys = [*count_keys(self.pool), self.key, self.seq_key]
        args = [c.instance, c.lease_ms, member, rank, int(max_wait * 1000), max_inflight, random.getrandbits(30),
                *candidates]
        ok, v = await c.conn.call(lambda: self._claim(keys=keys, args=args))
        v = v.decode() if isinstance(v, bytes) else v
        if int(ok):
            c._book(self.pool, v, 1)
            return v, member
        return None, v

    async def leave(self, member: str) -> None:
        try:
            await self.counts.conn.call(lambda: self.counts.conn.client.execute("ZREM", self.key, member))
        except Exception:  # noqa: BLE001 - its deadline drops it anyway
            pass

    def release(self, endpoint: str) -> None:
        self.counts.release(self.pool, endpoint)
