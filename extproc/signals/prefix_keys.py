"""Chained prefix keys of a request's prompt: the identity of "the same prefix".

* Chat ``messages`` are cut into segments, each closing at a ``user`` message (a trailing
  run of non-user messages is a last segment), as Higress does; the leading system prompt
  is a segment of its own. ``/v1/completions`` ``prompt`` strings are cut into
  ``chunk_chars`` chunks. Each segment/chunk is one depth.
* The key for depth *i* is ``xxh3_128(segment i, seed=key[i-1])`` (the low 64 bits of the
  previous key seed the next hash), starting from a seed over route, cluster, model and
  the request kind: order matters, equal segments don't cancel, and other routes/models
  never share keys.
* At memory speed: every message contributes length-prefixed, tagged pieces (the parsed
  strings, encoded once, never the body re-serialised) to one buffer, and each segment is
  one C call of xxh3 over its byte range of that buffer (~30 GB/s: a 220 KB prompt is
  hashed in a few µs). The Python work per message is a handful of type checks.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import xxhash

_TOOL_FIELDS = ("tool_calls", "function_call", "name", "tool_call_id")
_SYSTEM_ROLES = ("system", "developer")
_MASK = 0xFFFFFFFFFFFFFFFF
_h128 = xxhash.xxh3_128_intdigest


def _stable(x: Any) -> str:
    return json.dumps(x, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _piece(out: list, tag: bytes, s: str) -> None:
    b = s.encode("utf-8", "surrogatepass")
    out.append(tag + len(b).to_bytes(8, "little"))
    out.append(b)


def _message(out: list, m: Any) -> None:
    """One message's pieces: role, then its content, then tool fields, then an end mark."""
    if type(m) is not dict:
        _piece(out, b"X", _stable(m))
        return
    role = m.get("role")
    _piece(out, b"R", role if type(role) is str else _stable(role))
    c = m.get("content")
    if type(c) is str:
        _piece(out, b"T", c)
    elif isinstance(c, list):
        for part in c:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                _piece(out, b"T", part["text"])
            elif isinstance(part, str):
                _piece(out, b"T", part)
            else:  # image_url, input_audio, ...: a stable representation of the part
                _piece(out, b"P", _stable(part))
    elif c is not None:
        _piece(out, b"J", _stable(c))
    if len(m) > 2 or role is None or c is None:  # tool calls (content absent) and tool results
        extra = {k: m[k] for k in _TOOL_FIELDS if m.get(k) is not None}
        if extra:
            _piece(out, b"F", _stable(extra))
    out.append(b"E")


def _chain(seed: int, data: bytes, ends: Sequence[int]) -> list[str]:
    """One key per segment ``data[ends[i-1]:ends[i]]``, each seeded by the previous key."""
    mv = memoryview(data)
    keys, prev, start = [], seed, 0
    for end in ends:
        k = _h128(mv[start:end], prev & _MASK)
        keys.append(f"{k:032x}")
        prev, start = k, end
    return keys


def _pieces(seed: int, chunks: list[bytes]) -> list[str]:
    ends, size = [], 0
    for c in chunks:
        size += len(c)
        ends.append(size)
    return _chain(seed, b"".join(chunks), ends)


def chat_keys(seed: int, messages: Sequence[Any], max_depth: int) -> list[str]:
    out: list[bytes] = []
    ends: list[int] = []
    size = 0
    n = len(messages)
    pending = False
    for i, m in enumerate(messages):
        mark = len(out)
        _message(out, m)
        size += sum(map(len, out[mark:]))
        pending = True
        is_dict = type(m) is dict
        role = m.get("role") if is_dict else None
        # Besides Higress's boundary at each user message, the leading system prompt is a
        # segment of its own: conversations that share a system prompt (but not their
        # first question) then share a key, and so the endpoint that caches that prompt.
        ends_system = (not ends and i + 1 < n and role in _SYSTEM_ROLES
                       and not (type(messages[i + 1]) is dict and messages[i + 1].get("role") in _SYSTEM_ROLES))
        if role == "user" or ends_system:
            ends.append(size)
            pending = False
            if len(ends) >= max_depth:
                break
    if pending:  # trailing assistant/tool messages after the last user message
        ends.append(size)
    return _chain(seed, b"".join(out), ends)


def prompt_keys(seed: int, prompt: Any, chunk_chars: int, max_depth: int) -> list[str]:
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]  # a batch: route by its first prompt
        if isinstance(prompt, list) and not all(isinstance(t, int) for t in prompt):
            return []
    if isinstance(prompt, str):
        text = prompt[:chunk_chars * max_depth]
        if text.isascii():  # byte offsets are character offsets: one buffer, no copy per chunk
            return _chain(seed, text.encode(), range(min(chunk_chars, len(text)), len(text) + chunk_chars, chunk_chars))
        return _pieces(seed, [text[i:i + chunk_chars].encode("utf-8", "surrogatepass")
                              for i in range(0, len(text), chunk_chars)])
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        step = max(1, chunk_chars // 4)  # token ids: ~4 chars a token
        ids = prompt[:step * max_depth]
        return _pieces(seed, [",".join(map(str, ids[i:i + step])).encode() for i in range(0, len(ids), step)])
    return []


def seed(route: str, cluster: str, model: str, kind: str) -> int:
    out: list[bytes] = [b"ai-lb/prefix_cache/v2"]
    for s in (route, cluster, model, kind):
        _piece(out, b"N", s)
    return xxhash.xxh3_64_intdigest(b"".join(out))


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
