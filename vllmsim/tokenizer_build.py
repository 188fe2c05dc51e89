"""Builds ``vllmsim/model/tokenizer.json`` and ``tokenizer_config.json`` (run as a script).

The simulator's tokenizer is a Hugging Face ``tokenizers`` pipeline, so a gateway that
loads these two files gets exactly the token ids the simulator computes:

* pre-tokenizer ``FixedLength(4)``: the text is cut into 4-character pieces from its
  start (so two prompts sharing a prefix of L characters share its first L // 4
  pieces), then ``ByteLevel`` (no regex, no prefix space) maps every UTF-8 byte to a
  printable symbol, as GPT-2/Llama-3 tokenizers do;
* model ``WordPiece`` with an empty continuing-subword prefix: each piece becomes the
  longest vocabulary entry that prefixes it, then the longest that prefixes the rest, ...
  Every single byte is in the vocabulary, so nothing is ever unknown (the encoding is
  lossless and decodes back to the text);
* vocabulary, in id order: the 256 bytes, every pair of printable ASCII / tab / newline
  characters, then every 3- and 4-character string over ``a-z`` and space.  Lowercase
  English-like text is therefore exactly 4 characters per token; capitals, digits and
  punctuation fall back to pairs (~3.3 characters per token on English prose); other
  scripts to bytes.

There is no BOS token and no special token: the chat template's role markers are plain
text, so the count of a rendered chat is the count of its text.
"""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

MODEL_DIR = Path(__file__).parent / "model"
ALPHABET = "abcdefghijklmnopqrstuvwxyz "
PIECE_CHARS = 4

# Renders like the simulator's historical rule: "<|role|>\ncontent\n" per message, then
# "<|assistant|>\n".  Written with whitespace control on every tag so it renders the same
# under Hugging Face's environment (trim_blocks, lstrip_blocks) and a plain jinja2 one.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|' ~ message['role'] ~ '|>\\n' -}}"
    "{%- set content = message.get('content') -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content is not none -%}"
    "{%- for part in content -%}"
    "{%- if not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{%- if part is string -%}{{- part -}}"
    "{%- elif part.get('type', 'text') == 'text' -%}{{- part['text'] -}}"
    "{%- else -%}{{- '<|' ~ part.get('type') ~ '|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- set calls = message.get('tool_calls') -%}"
    "{%- if calls is sequence and calls is not string and calls is not mapping -%}"
    "{%- for call in calls -%}"
    "{%- set fn = call.get('function', {}) if call is mapping else {} -%}"
    "{%- if fn is mapping -%}"
    "{{- '\\n<tool_call>' ~ fn.get('name', '') ~ '(' ~ fn.get('arguments', '') ~ ')' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what ByteLevel uses)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_vocab() -> dict[str, int]:
    b2u = bytes_to_unicode()

    def sym(s: str) -> str:
        return "".join(b2u[b] for b in s.encode())

    vocab: dict[str, int] = {}
    for b in range(256):
        vocab.setdefault(b2u[b], len(vocab))
    printable = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    for a in printable:
        for b in printable:
            vocab.setdefault(sym(a + b), len(vocab))
    for n in (3, PIECE_CHARS):
        for t in itertools.product(ALPHABET, repeat=n):
            vocab.setdefault(sym("".join(t)), len(vocab))
    return vocab


def build_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = build_vocab()
    unk = bytes_to_unicode()[0]
    tok = Tokenizer(models.WordPiece(vocab, unk_token=unk, continuing_subword_prefix="",
                                     max_input_chars_per_word=4 * PIECE_CHARS))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.FixedLength(length=PIECE_CHARS),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def tokenizer_config() -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 8192,
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": None,
        "eos_token": None,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def write(model_dir: Path = MODEL_DIR) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(model_dir / "tokenizer.json"), pretty=False)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else MODEL_DIR)
