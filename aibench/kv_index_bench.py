"""Micro-benchmarks of precise prefix routing (docs/benchmarks.md, "KV-events index").

    python -m aibench.kv_index_bench [--blocks 1000000] [--endpoints 8]

1. **Index throughput**: vLLM messages (built as vLLM 0.32 builds them: msgpack maps
   tagged by type) for ``--endpoints`` engines are decoded and applied by
   ``EventStream.on_message`` on one core: ``BlockStored`` events of 1-32 consecutive
   16-token blocks, one ``BlockRemoved`` per evicted block (as vLLM sends them), each
   engine evicting its oldest blocks once past 20k. Reported: block events (a stored or
   a removed block) per second, decode included.
2. **Memory per million blocks**: the index's allocations (tracemalloc) after storing
   ``--blocks`` blocks spread over the endpoints (each block on one engine), and the
   process RSS growth.
3. **Decision cost**: ``precise_prefix_cache`` deciding among 8 endpoints for a 2,000-token
   chat (the simulator's tokenizer and chat template), first turn (tokenized whole) and a
   later turn of the same chat (history reused), tokenization included.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import time
import tracemalloc

import msgpack


def _stored(hashes, parent, tokens, bs):
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": parent, "token_ids": tokens,
            "block_size": bs, "lora_id": None, "medium": "GPU", "lora_name": None,
            "extra_keys": [None] * len(hashes), "group_idx": 0, "kv_cache_spec_kind": "full_attention"}


def _removed(h):
    return {"type": "BlockRemoved", "block_hashes": [h], "medium": "GPU", "group_idx": 0}


def make_messages(endpoints: int, blocks: int, bs: int = 16, keep: int = 20_000, seed: int = 1):
    """Per endpoint: a list of payloads, and the number of block events they carry."""
    rng = random.Random(seed)
    out = {f"10.0.0.{i}:8000": [] for i in range(endpoints)}
    total = 0
    h = 1 << 40
    for addr, msgs in out.items():
        live: list[int] = []
        made = 0
        while made < blocks // endpoints:
            n = rng.randint(1, 32)
            hashes = list(range(h, h + n))
            h += n
            tokens = [rng.randrange(1000, 120000) for _ in range(n * bs)]
            events = []
            over = len(live) + n - keep
            if over > 0:
                events += [_removed(x) for x in live[:over]]
                del live[:over]
                total += over
            events.append(_stored(hashes, None, tokens, bs))
            live += hashes
            made += n
            total += n
            msgs.append(msgpack.packb([time.time(), events, 0], use_bin_type=True))
    return out, total


def bench_throughput(endpoints: int, blocks: int) -> float:
    from extproc.signals.kv_events.stream import EventStream
    from extproc.state.kv_block_index import KvBlockIndex

    msgs, total = make_messages(endpoints, blocks)
    idx = KvBlockIndex()
    streams = {a: EventStream(a, idx) for a in msgs}
    for s in streams.values():
        s.on_connected()
    gc.collect()
    t0 = time.process_time()
    for a, payloads in msgs.items():
        on = streams[a].on_message
        for seq, p in enumerate(payloads):
            on(seq, p)
    cpu = time.process_time() - t0
    rate = total / cpu
    print(f"index throughput: {total:,} block events ({endpoints} endpoints, 16-token blocks, "
          f"stores of 1-32 blocks, one BlockRemoved per evicted block) in {cpu:.2f} s CPU "
          f"-> {rate:,.0f} block events/s on one core ({cpu / total * 1e6:.2f} us each, msgpack decode included)")
    return rate


def bench_memory(endpoints: int, blocks: int) -> float:
    from extproc.state.kv_block_index import KvBlockIndex

    rng = random.Random(2)
    idx = KvBlockIndex(max_blocks=blocks + 1, max_blocks_per_endpoint=blocks + 1)
    views = [idx.view(f"10.0.0.{i}:8000") for i in range(endpoints)]
    gc.collect()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    h = 1 << 40
    per = blocks // endpoints
    for v in views:
        done = 0
        parent = None
        while done < per:
            n = min(32, per - done)
            tokens = [rng.randrange(1000, 120000) for _ in range(n * 16)]
            idx.stored(v, list(range(h, h + n)), parent, tokens, 16)
            parent = h + n - 1
            h += n
            done += n
    cur, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = idx.total
    print(f"memory: {n:,} blocks on {endpoints} endpoints -> {cur / 2**20:.0f} MiB allocated by the index "
          f"({cur / n:.0f} bytes per block, {cur / n * 1e6 / 2**20:.0f} MiB per million blocks); "
          f"peak RSS grew {(rss1 - rss0) / 1024:.0f} MiB (tracemalloc's own bookkeeping included)")
    return cur / n


def bench_decision() -> None:
    import vllmsim
    from extproc.config import EndpointsConfig, RouteConfig, policy_config
    from extproc.core import Endpoint, RequestContext
    from extproc.policies import PolicyEnv, registry
    from vllmsim import render_chat, tokenize
    from vllmsim.blockhash import block_hashes

    rng = random.Random(3)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(800)]

    def text(n_tokens: int) -> str:
        out, size = [], 0
        while size < n_tokens * 4:
            w = rng.choice(words)
            out.append(w)
            size += len(w) + 1
        return " ".join(out)

    eps = tuple(Endpoint(f"10.0.0.{i}:8000") for i in range(8))
    name = "precise_prefix_cache"
    rc = RouteConfig(name="r", lb_policy=name, endpoints=EndpointsConfig(static=()))
    t0 = time.perf_counter()
    pol = registry.get(name)(policy_config(registry.config_class(name), {"tokenizer": str(vllmsim.MODEL_DIR)}),
                             PolicyEnv.standalone(rc))
    load_s = time.perf_counter() - t0
    pol.on_candidates(eps)
    hub = pol.precise.hub
    msgs = [{"role": "system", "content": text(1200)}]
    for _ in range(4):
        msgs += [{"role": "user", "content": text(100)}, {"role": "assistant", "content": text(100)}]
    msgs.append({"role": "user", "content": text(50)})
    ids = tokenize(render_chat(msgs))
    for i, e in enumerate(eps):                      # every engine holds part of the chat
        st = hub.streams[e.address]
        st.on_connected()
        k = len(ids) // 16 * (i + 1) // 8
        st.on_message(0, msgpack.packb([0.0, [_stored(block_hashes(ids, 16)[:k], None, ids[:k * 16], 16)], 0]))

    def decide(doc) -> float:
        ctx = RequestContext("r", {})
        ctx.body = json.dumps(doc).encode()
        t = time.perf_counter()
        pol.decide(ctx, eps)
        dt = time.perf_counter() - t
        pol.on_done(ctx)
        return dt

    doc = {"model": "sim-model", "messages": msgs, "max_tokens": 16}
    tok = pol.precise.tokenizer
    t = time.perf_counter()
    tok.tokenizer.encode(tok.render(doc), add_special_tokens=False)
    whole = time.perf_counter() - t
    first = decide(doc)
    later = []
    for i in range(20):          # the same chat, one more turn each time: history reused
        msgs = msgs + [{"role": "assistant", "content": text(40)}, {"role": "user", "content": text(30)}]
        later.append(decide({"model": "sim-model", "messages": msgs, "max_tokens": 16}))
    again = [decide(doc) for _ in range(20)]
    later.sort()
    again.sort()
    print(f"decision cost (precise_prefix_cache, 8 endpoints, a {len(ids):,}-token chat, tokenizer loaded in "
          f"{load_s:.1f} s): first turn {first * 1e3:.2f} ms (whole-text tokenization alone {whole * 1e3:.2f} ms); "
          f"a new turn of the same chat {later[len(later) // 2] * 1e3:.2f} ms median; "
          f"the same prompt again {again[len(again) // 2] * 1e3:.2f} ms median "
          f"(tokenization cache: {tok.cache.stats})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aibench.kv_index_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=1_000_000)
    ap.add_argument("--endpoints", type=int, default=8)
    ap.add_argument("--events", type=int, default=400_000, help="stored blocks for the throughput run")
    a = ap.parse_args(argv)
    bench_throughput(a.endpoints, a.events)
    bench_memory(a.endpoints, a.blocks)
    bench_decision()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
