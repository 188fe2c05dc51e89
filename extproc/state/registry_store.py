"""Where registered instances live: this process (``MemoryRegistry``) or one Redis hash
shared by every ai-lb replica (``RedisRegistry``), so an instance registered with any
replica is routed to by all of them.

An instance is a JSON document keyed by its ``ip:port``; what it means is the registry
source's business (``extproc.discovery.registry``). Health is not stored: every replica
checks the instances itself (it must reach them anyway). Redis calls are bounded and go
through the breaker (``RedisConn``): an unavailable Redis raises ``RedisUnavailable``, and
the source keeps its last view.
"""

from __future__ import annotations

from typing import Protocol

import orjson

from .redis_conn import RedisConn, RedisUnavailable

__all__ = ["MemoryRegistry", "RedisRegistry", "RegistryFull", "RegistryStore", "RedisUnavailable"]


class RegistryFull(Exception):
    """The registry holds ``max_instances`` already."""


class RegistryStore(Protocol):
    async def put(self, iid: str, doc: dict, max_instances: int) -> None: ...

    async def remove(self, iid: str) -> None: ...

    async def all(self) -> dict[str, dict]: ...


class MemoryRegistry:
    def __init__(self) -> None:
        self.docs: dict[str, dict] = {}

    async def put(self, iid: str, doc: dict, max_instances: int) -> None:
        if iid not in self.docs and len(self.docs) >= max_instances:
            raise RegistryFull(f"the registry holds {max_instances} instances (registration.max_instances)")
        self.docs[iid] = dict(doc)

    async def remove(self, iid: str) -> None:
        self.docs.pop(iid, None)

    async def all(self) -> dict[str, dict]:
        return {k: dict(v) for k, v in self.docs.items()}


class RedisRegistry:
    """One hash, ``key``: field ``ip:port``, value the instance's JSON."""

    def __init__(self, conn: RedisConn, key: str) -> None:
        self.conn = conn
        self.key = key

    async def put(self, iid: str, doc: dict, max_instances: int) -> None:
        c = self.conn.client
        key = self.key
        exists, size = await self.conn.call(lambda: _exists_and_len(c, key, iid))
        if not exists and size >= max_instances:
            raise RegistryFull(f"the registry holds {max_instances} instances (registration.max_instances)")
        await self.conn.call(lambda: c.execute("HSET", key, iid, orjson.dumps(doc)))

    async def remove(self, iid: str) -> None:
        c = self.conn.client
        await self.conn.call(lambda: c.execute("HDEL", self.key, iid))

    async def all(self) -> dict[str, dict]:
        flat = await self.conn.call(lambda: self.conn.client.hgetall(self.key))
        out: dict[str, dict] = {}
        for k, v in flat.items():
            try:
                doc = orjson.loads(v)
            except ValueError:
                continue  # not ours (someone else wrote into the hash): skipped, never fatal
            if isinstance(doc, dict):
                out[k.decode() if isinstance(k, bytes) else str(k)] = doc
        return out


async def _exists_and_len(c, key: str, iid: str) -> tuple[int, int]:
    f1, f2 = c.send_now("HEXISTS", key, iid), c.send_now("HLEN", key)
    if f1 is None or f2 is None:  # not connected yet: one after the other
        return await c.execute("HEXISTS", key, iid), await c.execute("HLEN", key)
    return await f1, await f2
