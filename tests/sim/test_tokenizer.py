"""The shipped tokenizer.json / chat template are what the simulator tokenizes with."""
from __future__ import annotations

import json
import random
from typing import Any

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from vllmsim import MODEL_DIR, count_tokens, render_chat, tokenize
from vllmsim.tokenizer import PromptError
from vllmsim.tokenizer_build import build_tokenizer, tokenizer_config

TEXTS = ["", "a", "hello world", "Hello, World! It's 2026; naïve café — 東京 😀\n\ttabs",
         "<|user|>\nlorem ipsum dolor sit amet\n<|assistant|>\n", "x" * 5001]


def reference_render(messages: list[dict[str, Any]]) -> str:
    """The simulator's historical hand-written chat format (the template must equal it)."""
    out = []
    for msg in messages:
        content = msg.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        else:
            text = "\n".join(p if isinstance(p, str) else p["text"] if p.get("type", "text") == "text"
                             else f"<|{p.get('type')}|>" for p in content)
        calls = msg.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                fn = call.get("function", {}) if isinstance(call, dict) else {}
                if isinstance(fn, dict):
                    text += f"\n<tool_call>{fn.get('name', '')}({fn.get('arguments', '')})"
        out.append(f"<|{msg['role']}|>\n{text}\n")
    return "".join(out) + "<|assistant|>\n"


CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "  lead\n\n  spaces  "}, {"role": "user", "content": None},
     {"role": "assistant", "content": None, "tool_calls": [
         {"function": {"name": "f", "arguments": '{"a": 1}'}}, "x", {"function": "s"},
         {"function": {"arguments": {"k": [1, None]}}}]}],
    [{"role": "user", "content": [{"type": "text", "text": "a"}, "b", {"type": "image_url"},
                                  {"text": "default type"}]}],
    [{"role": "tool", "content": "{% raw %} {{ x }} <|x|>"}, {"role": "user", "content": []}],
    [{"role": "user", "content": "é 東京 😀", "tool_calls": {"function": {}}}],
]


def test_files_load_with_tokenizers_and_give_the_simulators_ids() -> None:
    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == tokenize(text)
        assert tok.decode(ids) == text  # lossless, bytes included
        assert count_tokens(text) == len(ids)
    assert tokenize("") == []


def test_memoised_pieces_equal_whole_text_encoding() -> None:
    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    rng = random.Random(7)
    alphabet = "abc XYZ,.\n\té東😀\u0301-'"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert tokenize(text) == tok.encode(text, add_special_tokens=False).ids, repr(text)


def test_shipped_files_are_what_the_builder_makes() -> None:
    shipped = json.loads((MODEL_DIR / "tokenizer.json").read_text())
    assert json.loads(build_tokenizer().to_str()) == shipped
    assert json.loads((MODEL_DIR / "tokenizer_config.json").read_text()) == tokenizer_config()


@pytest.mark.parametrize("messages", CHATS)
def test_chat_template_renders_like_render_chat_in_hf_environment(messages) -> None:
    config = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(config["chat_template"]).render(messages=messages, add_generation_prompt=True)
    assert text == render_chat(messages) == reference_render(messages)
    no_gen = env.from_string(config["chat_template"]).render(messages=messages, add_generation_prompt=False)
    assert text == no_gen + "<|assistant|>\n"


def test_four_characters_per_token_on_lowercase_text_and_fewer_on_prose() -> None:
    lower = "alpha beta gamma delta omicron upsilon model token cache prefix " * 300
    assert len(tokenize(lower)) == -(-len(lower) // 4)
    prose = ("The quick brown fox jumps over the lazy dog. It's a sentence, with Capitals, "
             "digits (42) and punctuation!\n") * 50
    assert 3.0 < len(prose) / len(tokenize(prose)) < 4.0


def test_prompts_sharing_a_prefix_share_its_tokens() -> None:
    system = "you are a helpful assistant who answers briefly. " * 40
    a = tokenize(render_chat([{"role": "system", "content": system}, {"role": "user", "content": "q one"}]))
    b = tokenize(render_chat([{"role": "system", "content": system}, {"role": "user", "content": "other"}]))
    common = f"<|system|>\n{system}\n<|user|>\n"
    head = common[: len(common) // 4 * 4]  # whole 4-character pieces of the shared text
    k = len(tokenize(head))
    assert k > 400 and a[:k] == b[:k] == tokenize(head)
    assert a[k:] != b[k:]


def test_lone_surrogates_are_a_prompt_error_not_a_crash() -> None:
    with pytest.raises(PromptError):
        tokenize("bad \ud800 text")
