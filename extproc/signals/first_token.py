"""When did a response produce its first generated token? (TTFT, as a client sees it.)

Fed the response body chunk by chunk: the first SSE chunk that carries generated text
marks the first token. vLLM's first chunk only carries ``"role":"assistant","content":""``
and keep-alive chunks are empty, so neither counts; a field split across two chunks is
still found (the tail of each chunk is kept). A non-streamed (whole JSON) answer's first
token is its first byte. A stream that ends without any text counts at its end.
"""

from __future__ import annotations

import re

# A JSON string field that carries generated text and is not empty. ``"content":""`` does
# not match; neither does an escaped quote inside a string.
_TOKEN_RE = re.compile(rb'"(?:content|reasoning_content|reasoning|text)"\s*:\s*"[^"]')
_TAIL = 48  # bytes kept from a chunk so a field split across two chunks is still found


class FirstToken:
    __slots__ = ("seen", "tail")

    def __init__(self) -> None:
        self.seen = False
        self.tail = b""

    def feed(self, chunk: bytes, end_of_stream: bool) -> bool:
        """True exactly once: on the chunk that carries the first token (or the stream's end)."""
        if self.seen:
            return False
        if chunk:
            if not self.tail and chunk.lstrip()[:1] in (b"{", b"["):
                self.seen = True        # a whole JSON answer, not SSE
                return True
            buf = self.tail + chunk
            if _TOKEN_RE.search(buf):
                self.seen, self.tail = True, b""
                return True
            self.tail = buf[-_TAIL:]
        if end_of_stream:
            self.seen = True
            return True
        return False
