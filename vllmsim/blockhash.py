"""vLLM v1's prefix-cache block hashes (``hash_block_tokens`` with ``sha256``).

Block ``i`` of a prompt hashes ``pickle.dumps((parent, tuple(token_ids of block i),
extra_keys), protocol=HIGHEST_PROTOCOL)`` with SHA-256, where ``parent`` is the 32-byte
hash of block ``i-1`` and, for block 0, ``NONE_HASH = sha256(pickle(PYTHONHASHSEED))``.
``extra_keys`` is ``None`` or, for a LoRA request, ``(lora_name,)`` on every block (as
vLLM's ``generate_block_hash_extra_keys``).  Events and the cache use vLLM's external
form: the low 64 bits of the digest as an unsigned int (``int.from_bytes(digest, "big")
& (2**64 - 1)``).

vLLM draws ``NONE_HASH`` at random unless ``PYTHONHASHSEED`` is set; the simulator always
behaves as if ``PYTHONHASHSEED=0`` (``HASH_SEED``) so every server and every process (a
gateway, an oracle) computes the same chain.
"""
from __future__ import annotations

import hashlib
import pickle
from typing import Sequence

HASH_SEED = "0"
_PROTO = pickle.HIGHEST_PROTOCOL
_MASK = (1 << 64) - 1


def _sha256(obj: object) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=_PROTO)).digest()


NONE_HASH = _sha256(HASH_SEED)


def extra_keys_for(lora_name: str | None) -> tuple[str, ...] | None:
    """The per-block ``extra_keys`` vLLM mixes into the hash (LoRA only here)."""
    return (lora_name,) if lora_name else None


def block_hashes(token_ids: Sequence[int], block_size: int, extra: str | None = None) -> list[int]:
    """External (uint64) hashes of every *full* block of ``token_ids``.

    ``extra`` is the LoRA adapter name (or None), so two adapters never share blocks.
    """
    keys = extra_keys_for(extra)
    parent = NONE_HASH
    out: list[int] = []
    dumps, sha, proto = pickle.dumps, hashlib.sha256, _PROTO
    tokens = list(token_ids)
    for i in range(0, len(tokens) // block_size * block_size, block_size):
        parent = sha(dumps((parent, tuple(tokens[i:i + block_size]), keys), protocol=proto)).digest()
        out.append(int.from_bytes(parent, "big") & _MASK)
    return out
