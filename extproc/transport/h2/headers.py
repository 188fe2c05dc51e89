"""Header blocks: HPACK decoding behind a cache of repeated blocks, and the stateless
literal encoding we answer with."""

from __future__ import annotations

import hpack

from .frames import CompressionError, EnhanceYourCalm

CACHE_SIZE = 4096


class HeaderDecoder:
    """Decodes request header blocks down to what the server needs: ``:path``.

    Envoy opens a stream per HTTP request with the same headers each time; once they sit
    in HPACK's dynamic table the block bytes repeat exactly. A block whose decoding left
    the dynamic table untouched can be skipped the next time (same bytes + same table =
    same headers), which takes HPACK (Huffman) decoding off the hot path. Any block that
    changes the table empties the cache, since index numbers then mean other headers.
    """

    __slots__ = ("decoder", "cache")

    def __init__(self, max_header_list_size: int) -> None:
        self.decoder = hpack.Decoder(max_header_list_size=max_header_list_size)
        self.cache: dict[bytes, str] = {}

    def _table_state(self) -> tuple[int, int, int]:
        t = self.decoder.header_table
        ents = t.dynamic_entries
        return len(ents), id(ents[0]) if ents else 0, t.maxsize

    def path_of(self, block: bytes) -> str:
        path = self.cache.get(block)
        if path is not None:
            return path
        before = self._table_state()
        try:
            headers = self.decoder.decode(block, raw=True)
        except hpack.OversizedHeaderListError as e:  # decoding stopped half-way: HPACK state is lost
            raise EnhanceYourCalm(f"header list too large: {e}") from None
        except Exception as e:  # noqa: BLE001 - any HPACK failure leaves the table unknown
            raise CompressionError(f"HPACK decoding failed: {e}") from None
        path = ""
        for k, v in headers:
            if k == b":path":
                path = v.decode("latin-1")
                break
        if self._table_state() == before:
            if len(self.cache) < CACHE_SIZE:
                self.cache[block] = path
        else:
            self.cache.clear()
        return path


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """HPACK literal without indexing, new name: stateless, so it is safe to precompute."""
    return b"\x00" + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value
