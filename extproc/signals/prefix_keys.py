"""Chained prefix keys of a request's prompt: the identity of "the same prefix".

* Chat ``messages`` are cut into segments, each closing at a ``user`` message (a trailing
  run of non-user messages is a last segment), as Higress does; the leading system prompt
  is a segment of its own. ``/v1/completions`` ``prompt`` strings are cut into
  ``chunk_chars`` chunks. Each segment/chunk is one depth.
* The key for depth *i* is ``blake2b(key[i-1] + segment i)``, starting from a seed over
  route, cluster, model and the request kind: order matters, equal segments don't cancel,
  and other routes/models never share keys. Hashing is incremental (length-prefixed
  pieces fed to the hash one by one), so a huge prompt is never joined into one string.
"""

from __future__ import annotations

import json
from hashlib import blake2b
from typing import Any, Iterator, Sequence

_DIGEST = 16
_TOOL_FIELDS = ("tool_calls", "function_call", "name", "tool_call_id")


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
