"""The real vLLM 0.32 KV-events capture, and messages built exactly as vLLM builds them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack

FIXTURE = Path("/work/shared/fixtures/vllm-0.32-kv-events.txt")


def raw_messages() -> list[tuple[list[bytes], list[Any]]]:
    """Each captured message: its three frames (from the hex) and the decoded payload."""
    lines = FIXTURE.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        if line.startswith("### message #"):
            topic = bytes.fromhex(lines[i + 1].split(":", 1)[1].split()[0])
            seq = bytes.fromhex(lines[i + 2].split(":", 1)[1].split()[0])
            payload = bytes.fromhex(lines[i + 4])
            decoded = json.loads(lines[i + 6])
            out.append(([topic, seq, payload], decoded))
    return out


def stored(hashes, tokens, parent=None, block_size=4, lora_id=None, lora_name=None, extra=None, medium="GPU"):
    """A BlockStored map with vLLM 0.32's keys, in its order."""
    return {"type": "BlockStored", "block_hashes": list(hashes), "parent_block_hash": parent,
            "token_ids": list(tokens), "block_size": block_size, "lora_id": lora_id, "medium": medium,
            "lora_name": lora_name, "extra_keys": extra if extra is not None else [None] * len(hashes),
            "group_idx": 0, "kv_cache_spec_kind": "full_attention"}


def removed(h, medium="GPU"):
    return {"type": "BlockRemoved", "block_hashes": [h], "medium": medium, "group_idx": 0}


CLEARED = {"type": "AllBlocksCleared"}


def payload(events, ts=1796172451.25, rank=0) -> bytes:
    return msgpack.packb([ts, events, rank], use_bin_type=True)


def frames(seq: int, events, topic: bytes = b"kv") -> list[bytes]:
    return [topic, seq.to_bytes(8, "big"), payload(events)]
