"""Unit tests of the pieces that need no event loop: tokenizer, KV cache, profiles, faults."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

import vllmsim

from vllmsim import Faults, load_profile, render_chat, tokenize
from vllmsim.kvcache import KVCache, block_hashes
from vllmsim.profile import OutputLen
from vllmsim.tokenizer import PromptError


def test_equal_prefixes_give_equal_tokens() -> None:
    sys_prompt = "You are a helpful assistant. " * 20
    a = tokenize(render_chat([{"role": "system", "content": sys_prompt},
                              {"role": "user", "content": "question one"}]))
    b = tokenize(render_chat([{"role": "system", "content": sys_prompt},
                              {"role": "user", "content": "a different question"}]))
    shared = len(f"<|system|>\n{sys_prompt}\n<|user|>\n") // 4
    assert a[:shared] == b[:shared]
    assert a != b


def test_tokens_stable_across_processes() -> None:
    code = "from vllmsim import tokenize; print(tokenize('hello world, stable ids'))"
    root = str(Path(vllmsim.__file__).resolve().parent.parent)
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={"PYTHONHASHSEED": seed, "PYTHONPATH": root}).stdout
            for seed in ("1", "2")}
    assert len(outs) == 1 and outs.pop().strip() == str(tokenize("hello world, stable ids"))


def test_render_chat_content_forms() -> None:
    parts = render_chat([{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                      {"type": "text", "text": "there"}]}])
    assert parts == "<|user|>\nhi\nthere\n<|assistant|>\n"
    tool = render_chat([{"role": "assistant", "content": None,
                         "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}])
    assert "<tool_call>f({})" in tool
    with pytest.raises(PromptError):
        render_chat([{"role": "user", "content": 5}])
    with pytest.raises(PromptError):
        render_chat([{"content": "no role"}])


def test_block_hashes_chain_and_full_blocks_only() -> None:
    toks = list(range(40))
    h = block_hashes(toks, 16)
    assert len(h) == 2  # 40 tokens -> 2 full blocks, the partial one is not hashed
    other = block_hashes([99] + toks[1:], 16)
    assert other[0] != h[0] and other[1] != h[1]  # block 1 differs only through the chain
    assert block_hashes(toks, 16, extra="lora-a")[0] != h[0]


def test_kvcache_prefix_hit_refcount_and_lru_eviction() -> None:
    kv = KVCache(num_blocks=6, block_size=4)
    ha = block_hashes(list(range(12)), 4)  # 3 full blocks
    a: list[int] = []
    assert kv.allocate(a, 12)
    kv.cache_blocks(a, ha, 0, 3)
    assert kv.usage() == pytest.approx(0.5)
    # A second request sharing the prefix takes references instead of new blocks.
    hits = kv.match_prefix(ha, 3)
    assert hits == a
    b: list[int] = []
    assert kv.allocate(b, 12, hits)
    assert all(kv.ref[x] == 2 for x in a)
    kv.free(b)
    kv.free(a)
    assert kv.usage() == 0.0 and len(kv.cached) == 3  # freed but still cached
    # Allocating 3 fresh blocks uses never-used blocks first: the cache survives.
    c: list[int] = []
    assert kv.allocate(c, 12)
    assert len(kv.cached) == 3
    # One more block forces eviction of the least recently freed: A's tail block first.
    d: list[int] = []
    assert kv.allocate(d, 4)
    assert ha[2] not in kv.cached and ha[0] in kv.cached
    assert kv.match_prefix(ha, 3) == a[:2]
    # Too big: refused without side effects.
    e: list[int] = []
    free_before = kv.num_free
    assert not kv.allocate(e, 100)
    assert kv.num_free == free_before and e == []


def test_profile_load_and_overrides(tmp_path) -> None:
    p = load_profile("h100-8b")
    assert p.block_size == 16 and p.num_gpu_blocks > 10000
    q = load_profile("h100-8b", {"num_gpu_blocks": 10, "base_ms": 1})
    assert q.num_gpu_blocks == 10 and q.effective_max_model_len == 160
    with pytest.raises(ValueError):
        load_profile("h100-8b", {"no_such_key": 1})
    f = tmp_path / "mine.yaml"
    f.write_text("block_size: 32\nnum_gpu_blocks: 100\noutput_len: {distribution: uniform, min: 2, max: 5}\n")
    r = load_profile(f)
    assert r.block_size == 32 and r.name == "mine"
    rng = random.Random(3)
    samples = {r.output_len.sample(rng, 100) for _ in range(200)}
    assert samples == {2, 3, 4, 5}
    assert OutputLen().sample(rng, 7) == 7


def test_faults_validation() -> None:
    f = Faults()
    f.update({"slowdown": 2, "error_rate": 0.5, "error_status": 503, "hang": True})
    assert f.to_dict() == {"slowdown": 2.0, "error_rate": 0.5, "error_status": 503, "hang": True}
    for bad in ({"slowdown": 0}, {"error_rate": 2}, {"error_status": 200}, {"hang": "yes"}, {"x": 1}):
        with pytest.raises(ValueError):
            f.update(bad)
    assert f.slowdown == 2.0  # a failed update changes nothing
    f.reset()
    assert f.to_dict() == Faults().to_dict()
