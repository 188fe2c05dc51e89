"""The request side of precise prefix routing: the model's tokenizer and chat template as
the engine applies them, tokenizations reused across turns, and the precise_prefix_cache
policy deciding from an index fed the way the engines feed it."""

from __future__ import annotations

import asyncio
import json
import random

import pytest

import vllmsim
from core_sim import done, env, route
from kv_fixture import payload, removed, stored
from extproc.config import ConfigError, policy_config
from extproc.core import Endpoint, RequestContext
from extproc.policies import registry
from extproc.runtime import parse_config
from extproc.signals.prompt_tokens import PromptTokenizer, TokenizeError
from extproc.signals.token_cache import TokenCache
from vllmsim import render_chat, tokenize
from vllmsim.blockhash import block_hashes

MODEL = str(vllmsim.MODEL_DIR)
BS = 16
EPS = tuple(Endpoint(f"10.0.0.{i}:8000") for i in range(1, 4))
A = [e.address for e in EPS]


@pytest.fixture(scope="module")
def tok():
    return PromptTokenizer(MODEL)


def words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 9))) for _ in range(n))


# -- tokenization as the engine does it -------------------------------------------------------------
def test_chat_and_completions_tokenize_exactly_as_the_simulated_engine(tok):
    msgs = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Part one"}, "part two"]},
            {"role": "assistant", "content": None,
             "tool_calls": [{"function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
            {"role": "user", "content": "Why? " * 40}]
    assert tok.tokens({"messages": msgs}) == tokenize(render_chat(msgs))
    assert tok.tokens({"messages": msgs, "add_generation_prompt": False}) == \
        tokenize(render_chat(msgs, add_generation_prompt=False))
    assert tok.tokens({"prompt": "Once upon a time " * 30}) == tokenize("Once upon a time " * 30)
    assert tok.tokens({"prompt": [5, 6, 7]}) == [5, 6, 7]
    assert tok.tokens({"prompt": ["first prompt", "second"]}) == tokenize("first prompt")
    for bad in ({}, {"messages": []}, {"messages": "x"}, {"prompt": 3}, [], {"messages": [{"role": "u",
                                                                                          "content": "\ud800"}]}):
        with pytest.raises(TokenizeError):
            tok.tokens(bad)


def test_a_long_chat_reuses_its_history_and_gets_the_tokenizers_own_answer(tok):
    rng = random.Random(3)
    msgs = [{"role": "system", "content": "System: " + words(rng, 400)}]
    for turn in range(6):
        msgs.append({"role": "user", "content": words(rng, rng.randint(5, 120)) + " Ok?"})
        doc = {"messages": msgs}
        before = tok.cache.stats["encoded_chars"]
        ids = tok.tokens(doc)
        assert ids == tok.tokenizer.encode(tok.render(doc), add_special_tokens=False).ids
        if turn:
            new_chars = tok.cache.stats["encoded_chars"] - before
            assert new_chars < len(tok.render(doc)) / 3, (turn, new_chars)   # only the new turn, not the history
        msgs.append({"role": "assistant", "content": words(rng, 40)})
    assert tok.cache.stats["full"] == 0


def test_prefix_reuse_is_exact_for_a_byte_level_bpe_with_special_tokens(tmp_path):
    """A real BPE (regex pre-tokenizer, merges across word pieces, added special tokens),
    trained here: spliced tokenizations equal whole-text ones on multi-turn chats."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers

    rng = random.Random(5)
    corpus = [words(rng, 60) for _ in range(300)]
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=3000, special_tokens=["<s>", "<|im_end|>"]))
    t.save(str(tmp_path / "tokenizer.json"))
    tmpl = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": tmpl, "bos_token": "<s>"}))
    pt = PromptTokenizer(tmp_path)
    assert pt.content_format == "string"
    msgs = [{"role": "system", "content": words(rng, 300)}]
    for _ in range(8):
        msgs.append({"role": "user", "content": words(rng, rng.randint(3, 80))})
        doc = {"messages": msgs}
        assert pt.tokens(doc) == t.encode(pt.render(doc), add_special_tokens=False).ids
        assert pt.tokens(doc)[0] == t.token_to_id("<s>")
        msgs.append({"role": "assistant", "content": words(rng, 30)})
    assert pt.cache.stats["hit"] >= 7 and pt.cache.stats["reused_tokens"] > 1000


def test_the_cache_is_bounded_and_gives_up_cleanly_when_tokens_depend_on_far_context():
    # A "tokenizer" whose every token depends on the text's length: splicing can never agree.
    def weird(text: str):
        n = len(text)
        return [n + i for i in range(n)], list(range(n)), list(range(1, n + 1))

    c = TokenCache(weird, max_tokens=5000)
    a = "x" * 1000
    assert c.encode(a) == weird(a)[0]
    assert c.encode(a + "y" * 10) == weird(a + "y" * 10)[0]
    assert c.stats["full"] == 1
    for i in range(20):
        c.encode(f"{i:04d}" + "z" * 1000)
    assert c.tokens <= 5000 and len(c) <= 5


# -- the policy ------------------------------------------------------------------------------------
def policy(lb: dict | None = None):
    cfg = {"tokenizer": MODEL, "kv_events": {"endpoint": "tcp://{host}:5557"}, **(lb or {})}
    p = registry.get("precise_prefix_cache")(policy_config(registry.config_class("precise_prefix_cache"), cfg),
                                              env("precise_prefix_cache"))
    p.on_candidates(EPS)      # no event loop here: streams without sockets, fed by the tests
    return p


def feed(p, address: str, seq: int, *events) -> None:
    st = p.precise.hub.streams[address]
    if st.connected is False:
        st.on_connected()               # what the socket monitor reports (no sockets in these tests)
    st.on_message(seq, payload(list(events)))


def store_prompt(p, address: str, seq: int, ids: list[int], lora: str | None = None) -> list[int]:
    """What the engine publishes after prefilling ``ids``: vLLM's hashes, its token ids."""
    n = len(ids) // BS
    hashes = block_hashes(ids, BS, lora)
    feed(p, address, seq, stored(hashes, ids[:n * BS], None, BS, lora_id=1 if lora else None, lora_name=lora,
                                 extra=[[lora] if lora else None] * n))
    return hashes


def chat(content: str, model: str = "m") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 1}


def decide(p, doc: dict):
    ctx = RequestContext("r", {})
    ctx.body = json.dumps(doc).encode()
    ctx.policy_state = None
    d = asyncio.run(route(p, ctx, EPS))
    done(p, ctx, 200)
    return d.address


def test_routes_to_the_endpoint_whose_events_show_the_prefix_and_follows_evictions():
    p = policy({"pending": False})
    doc = chat("a shared document " * 60 + "first question")
    ids = tokenize(render_chat(doc["messages"]))
    for i, a in enumerate(A):
        feed(p, a, 0)                                   # every engine heard from (an empty batch)
    hashes = store_prompt(p, A[1], 1, ids)
    assert {decide(p, doc) for _ in range(5)} == {A[1]}
    assert p.stats["precise_hit"] == 5
    feed(p, A[1], 2, *[removed(h) for h in hashes[3:]])     # evicted under pressure, but for 3 blocks
    store_prompt(p, A[2], 1, ids)
    assert decide(p, doc) == A[2]
    feed(p, A[2], 2, {"type": "AllBlocksCleared"})
    assert decide(p, doc) == A[1]                          # 3 blocks beat none


def test_endpoints_without_events_fall_back_to_the_approximate_match_and_it_is_counted():
    p = policy({"pending": False})
    doc = chat("a long system prompt " * 60 + "q")
    first = decide(p, doc)                  # nobody has events: approximate, which learns this pick
    assert p.stats["fallback:disconnected"] >= 3 and p.stats["fallback_pick"] == 1   # no engine ever connected
    assert {decide(p, doc) for _ in range(4)} == {first}   # the approximate index remembers where it went
    assert p.stats["fallback_pick"] == 5


def test_lora_requests_match_only_their_adapters_blocks():
    p = policy({"pending": False})
    base, lora = chat("context " * 80 + "x"), chat("context " * 80 + "x", model="sql-lora")
    ids = tokenize(render_chat(base["messages"]))
    for a in A:
        feed(p, a, 0)
    store_prompt(p, A[0], 1, ids)
    store_prompt(p, A[2], 1, ids, lora="sql-lora")
    assert decide(p, lora) == A[2]
    assert decide(p, base) == A[0]


def test_a_burst_sharing_a_new_prefix_stays_together_until_the_events_arrive():
    p = policy({"queue_weight": 0, "kv_cache_weight": 0})
    for a in A:
        feed(p, a, 0)
    doc = chat("brand new prefix " * 60 + "?")
    ctxs = []
    for _ in range(6):                                      # six at once: none has finished
        ctx = RequestContext("r", {})
        ctx.body = json.dumps(doc).encode()
        asyncio.run(route(p, ctx, EPS))
        ctxs.append(ctx)
    assert len({c.endpoint.address for c in ctxs}) == 1     # in-flight prompts count before BlockStored
    for c in ctxs:
        done(p, c, 200)
    assert not p.precise.pending                           # ended: only the events tell from now on


def test_config_is_validated_with_field_paths():
    def problems(lb):
        try:
            parse_config(json.dumps({"routes": {"llm": {"lb_policy": "precise_prefix_cache", "lb_config": lb,
                                                         "endpoints": {"static": ["127.0.0.1:1"]}}}}))
        except ConfigError as e:
            return "\n".join(e.problems)
        return ""

    assert problems({"tokenizer": MODEL}) == ""
    assert "routes.llm.lb_config.tokenizer: required" in problems({})
    assert "routes.llm.lb_config.tokenizer: no tokenizer.json" in problems({"tokenizer": "/nonexistent"})
    p = problems({"tokenizer": MODEL, "kv_events": {"endpoint": "http://x", "replay_endpoint": "tcp://*:5",
                                                    "stale_requests": 0}})
    for want in ("kv_events.endpoint: expected tcp://", "kv_events.replay_endpoint: is the engine's ROUTER",
                 "kv_events.stale_requests: must be >= 1"):
        assert f"routes.llm.lb_config.{want}" in p, p
    p = problems({"tokenizer": MODEL, "kv_events": {"endpoints": {"nohost": "tcp://a:1", "h:1": "udp://x"},
                                                    "bogus": 1}})
    for want in ("kv_events.endpoints.nohost: expected a backend address", "kv_events.endpoints.h:1: expected tcp",
                 "kv_events.bogus: unknown field"):
        assert f"routes.llm.lb_config.{want}" in p, p
    assert "block_size" in problems({"tokenizer": MODEL, "block_size": -1})
    ok = {"tokenizer": MODEL, "kv_events": {"endpoint": "tcp://0.0.0.0:5557", "bind": "auto",
                                            "topic": "kv@{host}:{port}", "replay_endpoint": "tcp://{host}:{port+100}",
                                            "endpoints": {"10.0.0.9:8000": "tcp://10.0.0.9:{port+1}"}}}
    assert problems(ok) == ""
    cfg = policy_config(registry.config_class("precise_prefix_cache"), ok)
    s = cfg.kv_events
    assert s.binds(s.url("10.0.0.1:8000")) and s.url("10.0.0.9:8000") == "tcp://10.0.0.9:8001"
    assert s.replay_url("10.0.0.1:8000") == "tcp://10.0.0.1:8100" and s.topic_of("1.2.3.4:80") == "kv@1.2.3.4:80"


def test_the_bench_gives_its_precise_route_a_valid_config(tmp_path):
    from aibench.backends import SimFleet

    sim = SimFleet(3, tmp_path, [])
    sim.kv_base, sim.replay_base = 30000, 31000
    cfg = policy_config(registry.config_class("precise_prefix_cache"), sim.kv_lb_config())
    s = cfg.kv_events
    a = f"127.0.0.1:{sim.ports[2]}"
    assert s.url(a) == "tcp://127.0.0.1:30002" and s.binds(s.url(a)) and s.replay_url(a) == "tcp://127.0.0.1:31002"
