"""vLLM's KV-cache event wire format (``vllm/distributed/kv_events.py``), decoded with msgpack.

A message is multipart ``[topic, seq, payload]``: ``seq`` an 8-byte big-endian counter
per publisher (from 0, back to 0 when the engine restarts), ``payload`` msgpack of
``[ts, events, data_parallel_rank]``. Events, as vLLM 0.32 sends them (the capture in
``shared/fixtures/vllm-0.32-kv-events.txt``), are maps tagged by ``"type"``:

* ``BlockStored``: ``block_hashes`` (one or more consecutive blocks), ``parent_block_hash``
  (the block before the first, or null), ``token_ids`` (blocks x ``block_size``),
  ``block_size``, ``lora_id``, ``medium``, ``lora_name``, ``extra_keys`` (per block),
  ``group_idx``, ``kv_cache_spec_kind``;
* ``BlockRemoved``: ``block_hashes`` (one per event), ``medium``, ``group_idx``;
* ``AllBlocksCleared``.

Older vLLM releases encode the same events as msgspec ``array_like`` tagged structs
(``["BlockStored", hashes, parent, token_ids, block_size, lora_id, medium, lora_name]``);
both are read. Anything else (a wrong frame count, a payload that is not msgpack, an
event of the wrong shape) raises ``WireError`` for that message or yields a ``Bad`` event,
which the caller counts and skips: bad input never stops the stream.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack

STORED, REMOVED, CLEARED, BAD = "stored", "removed", "cleared", "bad"
_LIMITS = dict(raw=False, strict_map_key=False)   # sizes bounded by the socket (MAXMSGSIZE)


class WireError(ValueError):
    """A message that is not vLLM's KV-event format."""


class Message(NamedTuple):
    topic: bytes
    seq: int
    payload: bytes


class Batch(NamedTuple):
    ts: float
    events: list
    dp_rank: int | None


class Stored(NamedTuple):
    hashes: list
    parent: Any
    tokens: list
    block_size: int
    lora_id: Any
    lora_name: str | None
    medium: str | None
    extra_keys: list | None
    group_idx: int | None


class Removed(NamedTuple):
    hashes: list
    medium: str | None
    group_idx: int | None


class Cleared(NamedTuple):
    medium: str | None = None


class Bad(NamedTuple):
    why: str


def split_frames(frames: list) -> Message:
    """``[topic, seq, payload]`` (bytes or zmq frames) -> ``Message``."""
    if len(frames) != 3:
        raise WireError(f"expected 3 frames (topic, seq, payload), got {len(frames)}")
    topic, seq, payload = (bytes(f.buffer) if hasattr(f, "buffer") else bytes(f) for f in frames)
    if len(seq) != 8:
        raise WireError(f"sequence frame of {len(seq)} bytes, expected 8")
    return Message(topic, int.from_bytes(seq, "big"), payload)


def decode_payload(payload: bytes) -> Batch:
    try:
        doc = msgpack.unpackb(payload, **_LIMITS)
    except Exception as e:  # noqa: BLE001 - msgpack raises several types for bad bytes
        raise WireError(f"payload is not msgpack: {type(e).__name__}") from None
    if not isinstance(doc, (list, tuple)) or len(doc) < 2 or not isinstance(doc[1], (list, tuple)):
        raise WireError("payload is not [ts, events, data_parallel_rank]")
    ts = doc[0] if isinstance(doc[0], (int, float)) else 0.0
    rank = doc[2] if len(doc) > 2 and isinstance(doc[2], int) else None
    return Batch(float(ts), [event(e) for e in doc[1]], rank)


def _hash_list(x: Any) -> list | None:
    if not isinstance(x, list) or not x:
        return None
    for h in x:
        if not isinstance(h, (int, bytes)) or isinstance(h, bool):
            return None
    return x


def _opt_str(x: Any) -> str | None:
    return x if isinstance(x, str) else None


def _opt_int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def _stored(hashes, parent, tokens, block_size, lora_id, medium, lora_name, extra_keys, group_idx):
    hashes = _hash_list(hashes)
    if hashes is None:
        return Bad("BlockStored.block_hashes")
    if parent is not None and (not isinstance(parent, (int, bytes)) or isinstance(parent, bool)):
        return Bad("BlockStored.parent_block_hash")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size <= 0:
        return Bad("BlockStored.block_size")
    if not isinstance(tokens, list) or len(tokens) != len(hashes) * block_size:
        return Bad("BlockStored.token_ids")
    if extra_keys is not None and (not isinstance(extra_keys, list) or len(extra_keys) != len(hashes)):
        return Bad("BlockStored.extra_keys")
    return Stored(hashes, parent, tokens, block_size, lora_id, _opt_str(lora_name), _opt_str(medium),
                  extra_keys, _opt_int(group_idx))


def event(e: Any):
    """One event, map or array form -> ``Stored`` / ``Removed`` / ``Cleared`` / ``Bad``."""
    if isinstance(e, dict):
        t = e.get("type")
        if t == "BlockStored":
            return _stored(e.get("block_hashes"), e.get("parent_block_hash"), e.get("token_ids"),
                           e.get("block_size"), e.get("lora_id"), e.get("medium"), e.get("lora_name"),
                           e.get("extra_keys"), e.get("group_idx"))
        if t == "BlockRemoved":
            hashes = _hash_list(e.get("block_hashes"))
            if hashes is None:
                return Bad("BlockRemoved.block_hashes")
            return Removed(hashes, _opt_str(e.get("medium")), _opt_int(e.get("group_idx")))
        if t == "AllBlocksCleared":
            return Cleared(_opt_str(e.get("medium")))
        return Bad(f"type {str(t)[:40]!r}")
    if isinstance(e, (list, tuple)) and e and isinstance(e[0], str):
        t, rest = e[0], list(e[1:])
        if t == "BlockStored" and len(rest) >= 5:
            rest += [None] * (8 - len(rest))
            hashes, parent, tokens, bs, lora_id, medium, lora_name, extra = rest[:8]
            return _stored(hashes, parent, tokens, bs, lora_id, medium, lora_name,
                           extra if isinstance(extra, list) else None, None)
        if t == "BlockRemoved" and len(rest) >= 1:
            hashes = _hash_list(rest[0])
            if hashes is None:
                return Bad("BlockRemoved.block_hashes")
            return Removed(hashes, _opt_str(rest[1]) if len(rest) > 1 else None, None)
        if t == "AllBlocksCleared":
            return Cleared()
        return Bad(f"array event {t[:40]!r}")
    return Bad("not an event")
