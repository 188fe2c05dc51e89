"""A deterministic stand-in for a real tokenizer.

The simulator only needs two properties of a tokenizer: a plausible token *count*
(prefill cost and KV blocks scale with it) and *prefix stability* (two prompts sharing a
prefix share the token ids of that prefix, so prefix caching behaves like vLLM's).

Rule: the text is cut into consecutive 4-character pieces from its start (the last piece
may be shorter); piece ``p`` becomes token id ``zlib.crc32(p.encode()) % VOCAB_SIZE``.
Because pieces are aligned to the start of the text, two texts with a common prefix of
``L`` characters share their first ``L // 4`` tokens exactly.  ``zlib.crc32`` is used
instead of ``hash()`` because ``hash()`` of a str changes per process (PYTHONHASHSEED),
which would make prefix hashes differ between a gateway and the simulator.

~4 characters per token is the usual rule of thumb for English with Llama-3's tokenizer.
"""
from __future__ import annotations

import zlib
from typing import Any, Iterable

CHARS_PER_TOKEN = 4
VOCAB_SIZE = 128256  # Llama-3


class PromptError(ValueError):
    """The request's prompt/messages are malformed (maps to HTTP 400)."""


def tokenize(text: str) -> list[int]:
    """Token ids of ``text`` (see the module docstring for the rule)."""
    crc = zlib.crc32
    return [crc(text[i:i + CHARS_PER_TOKEN].encode()) % VOCAB_SIZE
            for i in range(0, len(text), CHARS_PER_TOKEN)]


def count_tokens(text: str) -> int:
    """Number of tokens ``tokenize`` would return, without building them."""
    return -(-len(text) // CHARS_PER_TOKEN)


def _content_text(content: Any, idx: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                ptype = part.get("type", "text")
                if ptype == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise PromptError(f"messages[{idx}].content: text part needs a string 'text'")
                    parts.append(text)
                else:
                    # Images/audio: a fixed placeholder so the count is stable.
                    parts.append(f"<|{ptype}|>")
            else:
                raise PromptError(f"messages[{idx}].content: parts must be objects")
        return "\n".join(parts)
    raise PromptError(f"messages[{idx}].content must be a string, a list of parts or null")


def render_chat(messages: Iterable[Any]) -> str:
    """Flatten chat messages into the prompt text the engine tokenizes.

    Format: ``<|role|>\\ncontent\\n`` per message, then ``<|assistant|>\\n`` (the
    generation prompt).  Tool calls are rendered as their JSON-ish function name and
    arguments so that tool-only assistant turns (content null) still cost tokens.
    """
    out: list[str] = []
    for idx, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise PromptError(f"messages[{idx}] must be an object")
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise PromptError(f"messages[{idx}].role must be a non-empty string")
        text = _content_text(msg.get("content"), idx)
        tool_calls = msg.get("tool_calls")
        if isinstance(tool_calls, list):
            for call in tool_calls:
                fn = call.get("function", {}) if isinstance(call, dict) else {}
                if isinstance(fn, dict):
                    text += f"\n<tool_call>{fn.get('name', '')}({fn.get('arguments', '')})"
        out.append(f"<|{role}|>\n{text}\n")
    out.append("<|assistant|>\n")
    return "".join(out)
