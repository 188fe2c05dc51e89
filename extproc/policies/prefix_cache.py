"""prefix_cache: send a prompt to the endpoint that served its longest known prefix.

Higress's ``prefix_cache`` done properly (see docs/policies/prefix_cache.md):

* Chat ``messages`` are cut into segments, each closing at a ``user`` message (a trailing
  run of non-user messages is a last segment). ``/v1/completions`` ``prompt`` strings are
  cut into ``chunk_chars`` chunks. Each segment/chunk is one depth.
* The key for depth *i* is ``blake2b(key[i-1] + segment i)``, starting from a seed over
  route, cluster, model and the request kind: order matters, equal segments don't cancel,
  and other routes/models never share keys. Hashing is incremental (length-prefixed
  pieces fed to the hash one by one), so a huge prompt is never joined into one string.
* The index walks the chain while keys exist and point at a healthy candidate, refreshes
  their TTL, and routes to the deepest match; with no match it picks the least loaded
  endpoint from the in-flight counts shared with ``global_least_request``. The depths
  after the match (including a stale one) are then written with the chosen endpoint.
* Redis slow or down: that decision uses the process-local index; never fails a request.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from hashlib import blake2b
from typing import Any, Iterator, Sequence

from ..endpoints import Endpoint
from ..state.prefix_index import MemoryPrefixIndex, PrefixIndex, RedisPrefixIndex
from ..state.redis_conn import RedisUnavailable, connection, higress_redis_url
from ..state.stores import counts_for
from .base import Decision, Fallback, Policy

log = logging.getLogger("ai_lb.prefix_cache")

_DIGEST = 16
_TOOL_FIELDS = ("tool_calls", "function_call", "name", "tool_call_id")


@dataclass(frozen=True)
class PrefixCacheConfig:
    # Higress fields (same names); Redis is used only when serviceFQDN is set,
    # otherwise the global ``store`` (memory or a redis:// URL).
    serviceFQDN: str | None = None
    servicePort: int = 6379
    username: str = ""
    password: str = ""
    timeout: float = 50.0  # ms (Higress: 3000)
    database: int = 0
    redisKeyTTL: int = 1800  # seconds
    # ours
    chunk_chars: int = 256  # /v1/completions prompt chunk size
    # A prefix match is ignored (least loaded wins) when its endpoint has more than
    # balance_abs_threshold requests in flight above the least loaded one AND more than
    # balance_rel_threshold times as many: affinity must not pile a hot prefix onto one server.
    balance_abs_threshold: int = 8
    balance_rel_threshold: float = 1.5
    max_depth: int = 1000  # at most this many chained keys per request
    max_local_entries: int = 100_000  # memory index bound (LRU)

    def validate(self) -> list[tuple[str, str]]:
        out = []
        if self.serviceFQDN is not None and not self.serviceFQDN:
            out.append(("serviceFQDN", "must not be empty"))
        if not 1 <= self.servicePort <= 65535:
            out.append(("servicePort", "expected a port 1..65535"))
        if self.timeout <= 0:
            out.append(("timeout", "must be > 0 (milliseconds)"))
        if self.database < 0:
            out.append(("database", "must be >= 0"))
        if self.redisKeyTTL <= 0:
            out.append(("redisKeyTTL", "must be > 0 (seconds)"))
        if self.chunk_chars <= 0:
            out.append(("chunk_chars", "must be > 0"))
        if self.max_depth <= 0:
            out.append(("max_depth", "must be > 0"))
        if self.balance_abs_threshold < 0:
            out.append(("balance_abs_threshold", "must be >= 0"))
        if self.balance_rel_threshold < 1:
            out.append(("balance_rel_threshold", "must be >= 1"))
        if self.max_local_entries <= 0:
            out.append(("max_local_entries", "must be > 0"))
        return out


# -- prompt -> chained keys ------------------------------------------------------------
def _put(h: Any, tag: bytes, s: str) -> None:
    b = s.encode("utf-8", "surrogatepass")
    h.update(tag)
    h.update(len(b).to_bytes(8, "little"))
    h.update(b)


def _stable(x: Any) -> str:
    return json.dumps(x, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _feed_message(h: Any, m: Any) -> None:
    """One message into the running segment hash: role, then its content pieces."""
    if not isinstance(m, dict):
        _put(h, b"X", _stable(m))
        return
    role = m.get("role")
    _put(h, b"R", role if isinstance(role, str) else _stable(role))
    c = m.get("content")
    if isinstance(c, str):
        _put(h, b"T", c)
    elif isinstance(c, list):
        for part in c:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                _put(h, b"T", part["text"])
            elif isinstance(part, str):
                _put(h, b"T", part)
            else:  # image_url, input_audio, ...: a stable representation of the part
                _put(h, b"P", _stable(part))
    elif c is not None:
        _put(h, b"J", _stable(c))
    extra = {k: m[k] for k in _TOOL_FIELDS if m.get(k) is not None}
    if extra:  # tool calls (content absent) and tool results
        _put(h, b"F", _stable(extra))
    h.update(b"E")


_SYSTEM_ROLES = ("system", "developer")


def chat_keys(seed: bytes, messages: Sequence[Any], max_depth: int) -> list[str]:
    keys: list[str] = []
    prev = seed
    h = blake2b(prev, digest_size=_DIGEST)
    pending = False
    n = len(messages)
    for i, m in enumerate(messages):
        _feed_message(h, m)
        pending = True
        is_user = isinstance(m, dict) and m.get("role") == "user"
        # Besides Higress's boundary at each user message, the leading system prompt is a
        # segment of its own: conversations that share a system prompt (but not their
        # first question) then share a key, and so the endpoint that caches that prompt.
        ends_system = (not keys and i + 1 < n and isinstance(m, dict) and m.get("role") in _SYSTEM_ROLES
                       and not (isinstance(messages[i + 1], dict) and messages[i + 1].get("role") in _SYSTEM_ROLES))
        if is_user or ends_system:
            prev = h.digest()
            keys.append(prev.hex())
            if len(keys) >= max_depth:
                return keys
            h = blake2b(prev, digest_size=_DIGEST)
            pending = False
    if pending:  # trailing assistant/tool messages after the last user message
        keys.append(h.digest().hex())
    return keys


def _chunks(prompt: Any, n: int) -> Iterator[bytes]:
    if isinstance(prompt, str):
        for i in range(0, len(prompt), n):
            yield prompt[i:i + n].encode("utf-8", "surrogatepass")
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        step = max(1, n // 4)  # token ids: ~4 chars a token
        for i in range(0, len(prompt), step):
            yield ",".join(map(str, prompt[i:i + step])).encode()


def prompt_keys(seed: bytes, prompt: Any, chunk_chars: int, max_depth: int) -> list[str]:
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]  # a batch: route by its first prompt
        if isinstance(prompt, list) and not all(isinstance(t, int) for t in prompt):
            return []
    keys: list[str] = []
    prev = seed
    for chunk in _chunks(prompt, chunk_chars):
        h = blake2b(prev, digest_size=_DIGEST)
        h.update(chunk)
        prev = h.digest()
        keys.append(prev.hex())
        if len(keys) >= max_depth:
            break
    return keys


def seed(route: str, cluster: str, model: str, kind: str) -> bytes:
    h = blake2b(b"ai-lb/prefix_cache/v1", digest_size=_DIGEST)
    for s in (route, cluster, model, kind):
        _put(h, b"N", s)
    return h.digest()


def request_keys(doc: dict, route: str, cluster: str, chunk_chars: int = 256, max_depth: int = 1000) -> list[str]:
    """The chained prefix keys of a request body (empty: nothing to match on)."""
    model = doc.get("model")
    model = model if isinstance(model, str) else ""
    msgs = doc.get("messages")
    if isinstance(msgs, list) and msgs:
        return chat_keys(seed(route, cluster, model, "chat"), msgs, max_depth)
    if "prompt" in doc:
        return prompt_keys(seed(route, cluster, model, "completion"), doc["prompt"], chunk_chars, max_depth)
    return []


# -- the policy ------------------------------------------------------------------------
_SHARED_LOCAL: dict[int, MemoryPrefixIndex] = {}


class PrefixCache(Policy):
    name = "prefix_cache"
    Config = PrefixCacheConfig
    needs_body = True

    def __init__(self, config: PrefixCacheConfig, env) -> None:
        super().__init__(config, env)
        self.cluster = env.route.endpoints.cluster or "static"
        self.pool = f"{env.route.name}|{self.cluster}"
        self.ttl = float(config.redisKeyTTL)
        c = config
        if c.serviceFQDN:
            self.store_url = higress_redis_url(c.serviceFQDN, c.servicePort, c.username, c.password, c.database)
        else:
            self.store_url = env.store_url
        self.timeout_s = c.timeout / 1000.0
        # Process-wide local index (survives reloads; keys are namespaced by route|cluster).
        self.local = _SHARED_LOCAL.setdefault(c.max_local_entries, MemoryPrefixIndex(c.max_local_entries))
        self.index: PrefixIndex = self.local
        self.counts: Any = None
        self.stats = {"hit": 0, "miss": 0, "index_fallback": 0, "imbalanced": 0}
        self._counts_started = False

    async def start(self) -> None:
        self.counts = counts_for(self.store_url, self.timeout_s)
        await self.counts.start()  # RedisCounts: the lease heartbeat, shared by its users
        self._counts_started = True
        if self.store_url != "memory":
            self.index = RedisPrefixIndex(connection(self.store_url, self.timeout_s))

    async def close(self) -> None:
        if self._counts_started:
            self._counts_started = False
            await self.counts.stop()

    async def pick(self, ctx, candidates: Sequence[Endpoint]) -> Decision:
        if not candidates:
            return Fallback("no_healthy_endpoints")
        doc = ctx.json()  # BodyError -> the core falls back with its reason
        c = self.config
        keys = request_keys(doc, self.env.route.name, self.cluster, c.chunk_chars, c.max_depth)
        by_addr = {e.address: e for e in candidates}
        healthy = list(by_addr)
        idx = self.index
        depth, host = 0, None
        if keys:
            if idx is self.local:
                depth, host = self.local.match_now(self.pool, keys, healthy, self.ttl)
            else:
                try:
                    depth, host = await idx.match(self.pool, keys, healthy, self.ttl)
                except RedisUnavailable:
                    self.stats["index_fallback"] += 1
                    idx = self.local
                    depth, host = self.local.match_now(self.pool, keys, healthy, self.ttl)
        if host is None or host not in by_addr:
            depth, host = 0, None
        elif len(healthy) > 1 and await self._overloaded(host, healthy):
            self.stats["imbalanced"] += 1
            depth, host = 0, None  # keys are re-recorded below with the less loaded endpoint

        counted = True
        try:
            if host is not None:
                await self.counts.incr(self.pool, host)
            else:
                host, _ = await self.counts.pick_least(self.pool, healthy)
        except Exception as e:  # noqa: BLE001 - counts store trouble must not fail the request
            log.warning("prefix_cache %s: in-flight counts failed (%r); not counted", self.pool, e)
            counted = False
        if host is None:  # pick_least refused or failed
            host = random.choice(healthy)
            counted = False
        self.stats["hit" if depth else "miss"] += 1
        ctx.policy_state = (self.pool, host) if counted else None

        rest = keys[depth:]
        if idx is self.local:
            if rest:
                self.local.record_now(self.pool, rest, host, self.ttl)
        else:
            if rest:
                try:
                    await idx.record(self.pool, rest, host, self.ttl)
                except RedisUnavailable:
                    self.stats["index_fallback"] += 1
            # write-through, so a Redis outage keeps this instance's affinity
            self.local.record_now(self.pool, keys, host, self.ttl)
        return by_addr[host]

    async def _overloaded(self, host: str, healthy: list[str]) -> bool:
        try:
            counts = await self.counts.counts(self.pool, healthy)
        except Exception:  # noqa: BLE001 - no load view: keep the affinity
            return False
        mine, low = counts.get(host, 0), min(counts.values())
        c = self.config
        return mine - low > c.balance_abs_threshold and mine > c.balance_rel_threshold * low

    def on_done(self, ctx) -> None:
        st = ctx.policy_state
        if st:
            ctx.policy_state = None
            self.counts.release(*st)  # exactly once; local now, Redis right after


POLICY = PrefixCache
