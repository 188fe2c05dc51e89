"""Cluster-wide in-flight counts in Redis, with per-instance leases.

Layout per pool (route + cluster); every key carries the hash tag ``{ailb:<pool>}`` so a
pool lives in one Redis Cluster slot, and every script declares all the keys it touches:

* ``{ailb:P}:total``   hash  address -> in-flight count over all live instances
* ``{ailb:P}:by_inst`` hash  "<instance>|<address>" -> this instance's share
* ``{ailb:P}:leases``  hash  instance -> lease expiry (ms, Redis clock)

An instance refreshes its lease on every decision and by heartbeat; a script that finds
an expired lease subtracts that instance's shares from ``total`` and deletes them, so a
crashed gateway's in-flight counts disappear after one lease instead of leaking forever
(Higress's defect). Decrements only ever undo this instance's own positive share, so a
count can never go negative.

While Redis is slow or down (``RedisConn`` bounds each call and opens a breaker), picks
use this instance's own counts, which are always tracked locally; when Redis answers
again those counts are written back (resynchronised) for every pool.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from typing import Sequence

from typing import Callable

from .counts import least
from .redis_conn import RedisConn, RedisUnavailable, redact
from .redis_keys import count_keys

log = logging.getLogger("ai_lb.redis")

_REAP = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function reap(now)
  local leases = redis.call('HGETALL', KEYS[3])
  for i = 1, #leases, 2 do
    if tonumber(leases[i + 1]) < now then
      local dead = leases[i]
      local prefix = dead .. '|'
      local shares = redis.call('HGETALL', KEYS[2])
      for j = 1, #shares, 2 do
        if string.sub(shares[j], 1, #prefix) == prefix then
          local addr = string.sub(shares[j], #prefix + 1)
          local n = tonumber(shares[j + 1])
          if n > 0 then
            local left = redis.call('HINCRBY', KEYS[1], addr, -n)
            if left <= 0 then redis.call('HDEL', KEYS[1], addr) end
          end
          redis.call('HDEL', KEYS[2], shares[j])
        end
      end
      redis.call('HDEL', KEYS[3], dead)
    end
  end
end
"""

# KEYS: total, by_inst, leases. ARGV: instance, lease_ms, max_count, random, candidates...
PICK_LEAST = _REAP + """
local now = now_ms()
reap(now)
local inst = ARGV[1]
redis.call('HSET', KEYS[3], inst, now + tonumber(ARGV[2]))
local maxc = tonumber(ARGV[3])
local cands = {}
for i = 5, #ARGV do cands[#cands + 1] = ARGV[i] end
local vals = redis.call('HMGET', KEYS[1], unpack(cands))
local low = nil
local ties = {}
for i, c in ipairs(cands) do
  local n = tonumber(vals[i]) or 0
  if low == nil or n < low then low = n; ties = {c} elseif n == low then ties[#ties + 1] = c end
end
if maxc > 0 and low >= maxc then return {false, low} end
local choice = ties[(tonumber(ARGV[4]) % #ties) + 1]
redis.call('HINCRBY', KEYS[1], choice, 1)
redis.call('HINCRBY', KEYS[2], inst .. '|' .. choice, 1)
return {choice, low + 1}
"""

# KEYS: total, by_inst, leases. ARGV: instance, lease_ms, address
INCR = _REAP + """
local now = now_ms()
redis.call('HSET', KEYS[3], ARGV[1], now + tonumber(ARGV[2]))
redis.call('HINCRBY', KEYS[2], ARGV[1] .. '|' .. ARGV[3], 1)
return redis.call('HINCRBY', KEYS[1], ARGV[3], 1)
"""

# KEYS: total, by_inst. ARGV: instance, address. Undo only our own positive share.
DECR = """
local f = ARGV[1] .. '|' .. ARGV[2]
local mine = tonumber(redis.call('HGET', KEYS[2], f) or '0')
if mine <= 0 then return -1 end
if mine == 1 then redis.call('HDEL', KEYS[2], f) else redis.call('HINCRBY', KEYS[2], f, -1) end
local left = redis.call('HINCRBY', KEYS[1], ARGV[2], -1)
if left <= 0 then redis.call('HDEL', KEYS[1], ARGV[2]) end
return left
"""

# KEYS: total, by_inst, leases. ARGV: instance, lease_ms, addr1, n1, addr2, n2, ...
# Make this instance's shares equal to what it really has in flight.
RESYNC = _REAP + """
local now = now_ms()
redis.call('HSET', KEYS[3], ARGV[1], now + tonumber(ARGV[2]))
local prefix = ARGV[1] .. '|'
local want = {}
for i = 3, #ARGV, 2 do want[ARGV[i]] = tonumber(ARGV[i + 1]) end
local shares = redis.call('HGETALL', KEYS[2])
for j = 1, #shares, 2 do
  if string.sub(shares[j], 1, #prefix) == prefix then
    local addr = string.sub(shares[j], #prefix + 1)
    if want[addr] == nil then want[addr] = 0 end
  end
end
for addr, n in pairs(want) do
  local old = tonumber(redis.call('HGET', KEYS[2], prefix .. addr) or '0')
  if n > 0 then redis.call('HSET', KEYS[2], prefix .. addr, n) else redis.call('HDEL', KEYS[2], prefix .. addr) end
  if n ~= old then
    local left = redis.call('HINCRBY', KEYS[1], addr, n - old)
    if left <= 0 then redis.call('HDEL', KEYS[1], addr) end
  end
end
return 1
"""

# KEYS: leases. ARGV: instance, lease_ms
HEARTBEAT = """
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2]))
return 1
"""


pool_keys = count_keys  # the name the scripts' callers and tests use


class RedisCounts:
    """``GlobalCounts`` over Redis. ``mine`` is this instance's own ledger (what it has in
    flight per pool and address, Redis reachable or not): the local picks while Redis is
    down, and the truth a resync writes back."""

    def __init__(self, conn: RedisConn, lease_ttl: float = 10.0, instance: str | None = None,
                 events: Callable[[str, str], None] | None = None) -> None:
        self.url = conn.url
        self.conn = conn
        self.instance = instance or uuid.uuid4().hex[:12]
        self.lease_ms = int(lease_ttl * 1000)
        self.lease_ttl = lease_ttl
        self.mine: dict[str, dict[str, int]] = {}   # pool -> address -> in flight through us
        self.pools: set[str] = set()
        self._events = events or (lambda store, event: None)
        self._rng = random.Random()
        c = self.conn.client
        self._pick = c.register_script(PICK_LEAST)
        self._incr = c.register_script(INCR)
        self._decr = c.register_script(DECR)
        self._heartbeat = c.register_script(HEARTBEAT)
        self._task: asyncio.Task | None = None
        self._users = 0
        self._resync_needed = False
        self.conn.on_recover.append(self.resync)
        self._label = redact(conn.url)

    # -- lifecycle (shared by every policy on this store) ----------------------------
    async def start(self) -> None:
        self._users += 1
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._heartbeat_loop(), name="redis-lease")

    async def stop(self) -> None:
        self._users -= 1
        if self._users <= 0 and self._task is not None:
            self._task.cancel()
            self._task = None

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            for pool in list(self.pools):
                try:
                    await self.conn.call(lambda: self._heartbeat(keys=[pool_keys(pool)[2]], args=[self.instance, self.lease_ms]))
                except RedisUnavailable:
                    break
            if self._resync_needed and self.conn.breaker.allow():
                await self.resync()

    # -- GlobalCounts ------------------------------------------------------------------
    async def pick_least(self, pool: str, candidates: Sequence[str], max_count: int = 0) -> tuple[str | None, int]:
        self.pools.add(pool)
        try:
            r = await self.conn.call(lambda: self._pick(
                keys=pool_keys(pool), args=[self.instance, self.lease_ms, max_count, random.getrandbits(30), *candidates]))
        except RedisUnavailable:
            self._events(self._label, "local_pick")
            self._resync_needed = True
            mine = self.mine.get(pool, {})
            addr, low = least(candidates, lambda a: mine.get(a, 0), self._rng)
            if max_count > 0 and low >= max_count:
                return None, low
            self._book(pool, addr, 1)
            return addr, low + 1
        addr, n = r[0], int(r[1])
        if not addr:
            return None, n
        addr = addr.decode() if isinstance(addr, bytes) else addr
        self._book(pool, addr, 1)
        return addr, n

    def unavailable(self, event: str) -> None:
        """A call failed (Redis slow or down): count it, resync once Redis answers."""
        self._events(self._label, event)
        self._resync_needed = True

    def _book(self, pool: str, address: str, delta: int) -> None:
        mine = self.mine.setdefault(pool, {})
        n = mine.get(address, 0) + delta
        if n > 0:
            mine[address] = n
        else:
            mine.pop(address, None)  # never negative

    async def incr(self, pool: str, address: str) -> None:
        self.pools.add(pool)
        self._book(pool, address, 1)
        try:
            await self.conn.call(lambda: self._incr(keys=pool_keys(pool), args=[self.instance, self.lease_ms, address]))
        except RedisUnavailable:
            self._events(self._label, "local_count")
            self._resync_needed = True

    async def decr(self, pool: str, address: str) -> None:
        self._book(pool, address, -1)
        try:
            await self.conn.call(lambda: self._decr(keys=pool_keys(pool)[:2], args=[self.instance, address]))
        except RedisUnavailable:
            self._resync_needed = True  # the resync writes the true (lower) share later

    def release(self, pool: str, address: str) -> None:
        """Synchronous form of ``decr`` for ``on_done`` hooks: local now, Redis soon."""
        asyncio.get_running_loop().create_task(self.decr(pool, address))

    async def counts(self, pool: str, candidates: Sequence[str]) -> dict[str, int]:
        try:
            vals = await self.conn.call(lambda: self.conn.client.hmget(pool_keys(pool)[0], list(candidates)))
        except RedisUnavailable:
            mine = self.mine.get(pool, {})
            return {a: mine.get(a, 0) for a in candidates}
        return {a: int(v or 0) for a, v in zip(candidates, vals)}

    async def resync(self) -> None:
        """Write this instance's real in-flight counts back to Redis (after an outage,
        or after Redis restarted empty).

        The written shares are absolute, so they must match what Redis has applied: the
        snapshot is taken when no other call of ours awaits a reply (every earlier pick,
        count and decrement has landed and been booked locally), and all pools are sent in
        that same event-loop step, so nothing of ours can be ordered in between.
        """
        client = self.conn.client
        try:
            await self.conn.call(client.ping)  # connected (a reconnect would yield mid-snapshot)
        except RedisUnavailable:
            self._resync_needed = True
            return
        for _ in range(500):
            if client.outstanding() == 0:
                await asyncio.sleep(0)  # let callers whose replies just arrived book them
                if client.outstanding() == 0:
                    break
            else:
                await asyncio.sleep(0.001)
        futs = []
        for pool in list(self.pools):
            args: list = [self.instance, self.lease_ms]
            for a, n in self.mine.get(pool, {}).items():
                args += [a, n]
            f = client.send_now("EVAL", RESYNC, 3, *pool_keys(pool), *args)
            if f is None:  # the connection dropped since the ping
                self._resync_needed = True
                return
            futs.append(f)
        try:
            async with asyncio.timeout(max(self.conn.timeout, 1.0)):
                await asyncio.gather(*futs)
        except Exception:  # noqa: BLE001 - try again from the heartbeat
            self._resync_needed = True
            return
        self._resync_needed = False
        self._events(self._label, "resync")
