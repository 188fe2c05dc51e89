"""A request's prompt as the engine tokenizes it: the model's tokenizer and chat template.

Loaded from a model directory, like any Hugging Face model's files: ``tokenizer.json``
(the ``tokenizers`` pipeline) and ``tokenizer_config.json`` (its ``chat_template``, a
string or a list of named templates, or a ``chat_template.jinja`` file beside it, plus
the special tokens the template may name: ``bos_token``, ``eos_token``, ...).

What vLLM does, and so what this does:

* **chat**: the messages are rendered by the template in jinja2's sandboxed environment
  (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, ``tojson``, ``raise_exception``,
  ``strftime_now``) with ``add_generation_prompt`` (the request's, default true; false
  with ``continue_final_message``), the request's ``tools``, ``documents`` and
  ``chat_template_kwargs``, then encoded **without** special tokens (the template writes
  its own BOS). Message contents are passed as lists of parts when the template loops
  over them (vLLM's "openai" content format), else joined into one string with newlines
  (its "string" format); ``content_format`` forces one;
* **completions**: the prompt string is encoded **with** the tokenizer's special tokens
  (its post-processor's BOS); a prompt of token ids is used as it is;
* a batch of prompts is routed by its first.

Tokenizations are cached by text prefix (``token_cache``), so a chat's history is not
tokenized again every turn.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from .token_cache import Encoded, TokenCache

_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
_LOOPS_CONTENT = re.compile(r"\bfor\s+\w+\s+in\s+(\w+\s*(\[\s*['\"]content['\"]\s*\]|\.content)|content)\b")


class TokenizeError(ValueError):
    """The request cannot be tokenized as the engine would (no prompt, a template error)."""


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(msg: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(msg)


def _special(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


class PromptTokenizer:
    def __init__(self, directory: str | Path, content_format: str = "auto", cache_tokens: int = 2_000_000) -> None:
        from tokenizers import Tokenizer

        d = Path(directory)
        self.directory = d
        self.tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        cfg_path = d / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.specials = {k: s for k in _SPECIALS if (s := _special(cfg.get(k))) is not None}
        source = cfg.get("chat_template")
        if isinstance(source, list):   # named templates: the "default" one
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        jinja = d / "chat_template.jinja"
        if not isinstance(source, str) and jinja.exists():
            source = jinja.read_text()
        self.template_source = source if isinstance(source, str) else None
        self.template = self._compile(self.template_source) if self.template_source else None
        if content_format == "auto":
            content_format = "openai" if self.template_source and _LOOPS_CONTENT.search(self.template_source) \
                else "string"
        self.content_format = content_format
        # The post-processor's special tokens around a completions prompt (e.g. BOS).
        with_sp = self.tokenizer.encode("a", add_special_tokens=True).ids
        plain = self.tokenizer.encode("a", add_special_tokens=False).ids
        at = next((i for i in range(len(with_sp)) if with_sp[i:i + len(plain)] == plain), 0)
        self.prefix_ids, self.suffix_ids = with_sp[:at], with_sp[at + len(plain):]
        self.cache = TokenCache(self._encode_offsets, max_tokens=cache_tokens)

    @staticmethod
    def _compile(source: str):
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        return env.from_string(source)

    def _encode_offsets(self, text: str) -> Encoded:
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        offs = enc.offsets
        return enc.ids, [o[0] for o in offs], [o[1] for o in offs]

    # -- rendering ------------------------------------------------------------------------------
    def _messages(self, msgs: list) -> list:
        if self.content_format == "openai":
            return msgs
        out = []
        for m in msgs:
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, list):
                texts = [p if isinstance(p, str) else p.get("text", "") for p in c
                         if isinstance(p, str) or (isinstance(p, dict) and p.get("type", "text") == "text")]
                m = {**m, "content": "\n".join(t for t in texts if isinstance(t, str))}
            out.append(m)
        return out

    def render(self, doc: dict) -> str:
        """The chat prompt text of a chat request body, as the engine renders it."""
        if self.template is None:
            raise TokenizeError(f"no chat_template in {self.directory}")
        msgs = doc.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise TokenizeError("messages must be a non-empty list of objects")
        cont = doc.get("continue_final_message") is True
        agp = doc.get("add_generation_prompt")
        kwargs = doc.get("chat_template_kwargs")
        ctx = dict(self.specials)
        if isinstance(kwargs, dict):
            ctx.update({k: v for k, v in kwargs.items() if isinstance(k, str)})
        ctx.update(messages=self._messages(msgs), add_generation_prompt=(agp if isinstance(agp, bool) else True)
                   and not cont)
        for k in ("tools", "documents"):
            if doc.get(k) is not None:
                ctx[k] = doc[k]
        try:
            text = self.template.render(**ctx)
        except Exception as e:  # noqa: BLE001 - any template failure: the request is not ours to tokenize
            raise TokenizeError(f"chat template: {type(e).__name__}: {e}"[:300]) from None
        if cont:
            last = msgs[-1].get("content")
            if isinstance(last, str) and last and last in text:
                text = text[:text.rindex(last) + len(last)]
        return text

    # -- tokens ---------------------------------------------------------------------------------
    def tokens(self, doc: dict) -> list[int]:
        """The prompt token ids of a chat or completions request body."""
        if not isinstance(doc, dict):
            raise TokenizeError("the body is not a JSON object")
        if "messages" in doc:
            return self.encode(self.render(doc), special=doc.get("add_special_tokens") is True)
        p = doc.get("prompt")
        if isinstance(p, list) and p and not isinstance(p[0], int):
            p = p[0]
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return p
        if isinstance(p, str) and p:
            return self.encode(p, special=doc.get("add_special_tokens") is not False)
        raise TokenizeError("no prompt")

    def encode(self, text: str, special: bool = False) -> list[int]:
        try:
            ids = self.cache.encode(text)
        except (TypeError, ValueError, UnicodeError) as e:   # e.g. lone surrogates cannot cross to Rust
            raise TokenizeError(f"cannot tokenize: {e}"[:300]) from None
        if special and (self.prefix_ids or self.suffix_ids):
            return [*self.prefix_ids, *ids, *self.suffix_ids]
        return ids
