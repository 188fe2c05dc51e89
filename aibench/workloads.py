"""Seeded synthetic workloads, and the registry that also names the replays.

A workload is a list of *conversations* with start times (``traffic.py``). Conversations
arrive open-loop (on schedule, whether or not earlier ones finished); the turns of one
conversation are sequential, each sent after the previous answer plus a think time, with
the history growing as in a chat client. The same seed gives the same schedule and the
same texts for every system, so systems are compared on identical traffic.

``make(name, seed, duration, rate, env=..., params=...)`` builds one. ``env`` carries what
the harness learnt about the backends (``backends``: how many, ``kv_tokens``: one server's
KV-cache capacity in tokens); a generator that takes a keyword of that name gets it.
``params`` are the generator's own keywords (``--workload-param KEY=VALUE``).
"""

from __future__ import annotations

import inspect
import itertools
import math
import random
from dataclasses import dataclass
from typing import Any, Callable

from .traffic import CHARS_PER_TOKEN, Conversation, Turn, Workload, text

# One server of the simulator's default profile (h100-8b): 28,672 blocks of 16 tokens.
DEFAULT_KV_TOKENS = 28672 * 16

__all__ = ["WORKLOADS", "Spec", "make", "describe", "mean_request_shape", "distinct_prefix_tokens",
           "CHARS_PER_TOKEN", "Conversation", "Turn", "Workload", "text"]


def _poisson_times(rng: random.Random, rate: float, duration: float) -> list[float]:
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        out.append(t)


def _lognormal_tokens(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, rng.lognormvariate(math.log(median), sigma))))


def _chats(name: str, seed: int, duration: float, rate: float, systems: list[str], pick: Callable[[random.Random], int],
           turns: tuple[int, int], user_tokens: tuple[int, int], out_tokens: tuple[int, int],
           think_s: tuple[float, float]) -> Workload:
    rng = random.Random(seed)
    w = Workload(name, seed, duration, rate)
    for i, t0 in enumerate(_poisson_times(rng, rate, duration)):
        g = pick(rng)
        ts = [Turn(user=text(rng, rng.randint(*user_tokens)), max_tokens=rng.randint(*out_tokens),
                   think_s=rng.uniform(*think_s) if k else 0.0) for k in range(rng.randint(*turns))]
        for t in ts:
            t.answer = text(rng, t.max_tokens)
        w.conversations.append(Conversation(t0, systems[g], ts, g, i))
    return w


def _group_prompts(seed: int, groups: int, tokens: int) -> list[str]:
    return [f"[group {g}] " + text(random.Random(seed * 1000 + g), tokens) for g in range(groups)]


def shared_prefix(seed: int, duration: float, rate: float, kv_tokens: int = DEFAULT_KV_TOKENS, backends: int = 4,
                  system_tokens: int = 2500, groups: int = 0, zipf_s: float = 0.9, cache_share: float = 0.5,
                  turns: tuple[int, int] = (3, 8), user_tokens: tuple[int, int] = (40, 200),
                  out_tokens: tuple[int, int] = (40, 160), think_s: tuple[float, float] = (0.5, 2.0)) -> Workload:
    """Cache-pressured chats: many groups of users, each group sharing a long system prompt,
    group popularity Zipf(``zipf_s``), long multi-turn conversations whose history grows.

    ``groups`` (0 = automatic) is sized from one server's KV capacity: a server can keep
    about ``cache_share * kv_tokens / system_tokens`` system prompts cached beside its
    running requests; there are at least three times as many groups as that (so no single server
    can hold them all: round robin thrashes) and 0.6 x that x ``backends`` (so the fleet
    together can: a router that keeps each group on few servers hits)."""
    per_server = max(1, int(cache_share * kv_tokens / system_tokens))
    if groups <= 0:
        groups = max(3 * per_server, math.ceil(0.6 * backends * per_server))
    weights = [1.0 / (k + 1) ** zipf_s for k in range(groups)]
    cum = list(itertools.accumulate(weights))
    systems = _group_prompts(seed, groups, system_tokens)
    w = _chats("shared-prefix", seed, duration, rate, systems,
               lambda rng: rng.choices(range(groups), cum_weights=cum)[0], turns, user_tokens, out_tokens, think_s)
    w.info.update(groups=groups, system_tokens=system_tokens, zipf_s=zipf_s, kv_tokens_per_server=kv_tokens,
                  backends=backends, groups_one_server_holds=per_server,
                  distinct_system_prompt_tokens=distinct_prefix_tokens(w, histories=False),
                  distinct_prefix_tokens=distinct_prefix_tokens(w))
    return w


def shared_prefix_small(seed: int, duration: float, rate: float, groups: int = 8, system_tokens: int = 2000,
                        turns: tuple[int, int] = (3, 6), user_tokens: tuple[int, int] = (40, 200),
                        out_tokens: tuple[int, int] = (40, 160), think_s: tuple[float, float] = (0.5, 2.0)) -> Workload:
    """Groups of users share long system prompts, uniform popularity; every group fits every
    server's cache (the shared-prefix workload of the first benchmarks)."""
    w = _chats("shared-prefix-small", seed, duration, rate, _group_prompts(seed, groups, system_tokens),
               lambda rng: rng.randrange(groups), turns, user_tokens, out_tokens, think_s)
    w.info.update(groups=groups, system_tokens=system_tokens, distinct_prefix_tokens=distinct_prefix_tokens(w))
    return w


def distinct_prefix_tokens(w: Workload, histories: bool = True) -> int:
    """Tokens of the distinct prefixes the workload sends: its distinct system prompts and
    (``histories``) each conversation's own history, which only that conversation's later
    turns reuse. A cache holding all of them would hit on every reusable token."""
    n = sum(len(s) for s in {c.system for c in w.conversations if c.system})
    if histories:
        n += sum(len(t.user) + len(t.answer) for c in w.conversations for t in c.turns[:-1])
    return n // CHARS_PER_TOKEN


def no_sharing(seed: int, duration: float, rate: float, prompt_median: int = 400, out_median: int = 120) -> Workload:
    """Unique single-turn prompts with lognormal prompt and output lengths (medians and
    spreads in the range public chat traces report)."""
    rng = random.Random(seed)
    w = Workload("no-sharing", seed, duration, rate)
    for i, t0 in enumerate(_poisson_times(rng, rate, duration)):
        w.conversations.append(_single(rng, i, t0, prompt_median, out_median))
    return w


def _single(rng: random.Random, i: int, t0: float, prompt_median: int = 400, out_median: int = 120) -> Conversation:
    p = _lognormal_tokens(rng, prompt_median, 0.9, 16, 6000)
    o = _lognormal_tokens(rng, out_median, 0.8, 4, 1024)
    return Conversation(t0, None, [Turn(user=f"[{i}] " + text(rng, p), max_tokens=o)], -1, i)


def no_sharing_heavy(seed: int, duration: float, rate: float, prompt_median: int = 512, prompt_sigma: float = 1.2,
                     max_prompt: int = 6000, out_min: int = 32, out_alpha: float = 1.2, max_out: int = 2048) -> Workload:
    """Unique single-turn prompts, heavy-tailed: prompt lengths lognormal (median
    ``prompt_median``, sigma ``prompt_sigma``), output lengths Pareto (minimum ``out_min``,
    shape ``out_alpha``: median ~57, mean ~190 tokens), both capped to fit an 8k context.
    Meant for >= 0.9 load, where a few huge requests make queues that only a load-aware
    policy steers around."""
    rng = random.Random(seed)
    w = Workload("no-sharing-heavy", seed, duration, rate)
    shape = (prompt_median, prompt_sigma, max_prompt, out_min, out_alpha, max_out)
    for i, t0 in enumerate(_poisson_times(rng, rate, duration)):
        w.conversations.append(_heavy(rng, i, t0, *shape))
    return w


def _heavy(rng: random.Random, i: int, t0: float, prompt_median: int, prompt_sigma: float, max_prompt: int,
           out_min: int, out_alpha: float, max_out: int) -> Conversation:
    p = _lognormal_tokens(rng, prompt_median, prompt_sigma, 16, max_prompt)
    o = int(min(max_out, out_min * rng.paretovariate(out_alpha)))
    return Conversation(t0, None, [Turn(user=f"[{i}] " + text(rng, p), max_tokens=o)], -1, i)


def bursty(seed: int, duration: float, rate: float, on_s: float = 2.0, off_s: float = 4.0) -> Workload:
    """``no-sharing`` traffic in on/off bursts with the same mean rate."""
    return _bursts(Workload("bursty", seed, duration, rate), on_s, off_s, _single)


def bursty_heavy(seed: int, duration: float, rate: float, on_s: float = 2.0, off_s: float = 4.0,
                 prompt_median: int = 512, prompt_sigma: float = 1.2, max_prompt: int = 6000, out_min: int = 32,
                 out_alpha: float = 1.2, max_out: int = 2048) -> Workload:
    """``no-sharing-heavy``'s heavy-tailed requests in ``bursty``'s on/off bursts: the
    overload a gateway queue is for (meant for > 1.0 load: each burst runs at 3x the mean)."""
    shape = (prompt_median, prompt_sigma, max_prompt, out_min, out_alpha, max_out)
    return _bursts(Workload("bursty-heavy", seed, duration, rate), on_s, off_s,
                   lambda rng, i, t0: _heavy(rng, i, t0, *shape))


def _bursts(w: Workload, on_s: float, off_s: float, one: Callable[[random.Random, int, float], Conversation]) -> Workload:
    """Poisson arrivals during ``on_s``, none during ``off_s``, the same mean rate as ``w``'s."""
    rng = random.Random(w.seed)
    peak = w.rate * (on_s + off_s) / on_s
    t, i = 0.0, 0
    while t < w.duration_s:
        for dt in _poisson_times(rng, peak, min(on_s, w.duration_s - t)):
            w.conversations.append(one(rng, i, t + dt))
            i += 1
        t += on_s + off_s
    return w


def long_prompt(seed: int, duration: float, rate: float, prompt_kb: int = 220) -> Workload:
    """Single-turn requests with 200 KB+ prompts (long documents, RAG contexts)."""
    rng = random.Random(seed)
    w = Workload("long-prompt", seed, duration, rate)
    for i, t0 in enumerate(_poisson_times(rng, rate, duration)):
        tokens = prompt_kb * 1024 // CHARS_PER_TOKEN + rng.randint(0, 2000)
        w.conversations.append(Conversation(t0, None, [Turn(user=f"[{i}] " + text(rng, tokens), max_tokens=32)], -1, i))
    return w


def long_chat(seed: int, duration: float, rate: float, doc_median: int = 3000, doc_sigma: float = 0.4,
              max_doc: int = 5000, turns: tuple[int, int] = (2, 4), user_tokens: tuple[int, int] = (30, 150),
              out_tokens: tuple[int, int] = (100, 250), think_s: tuple[float, float] = (0.5, 2.0)) -> Workload:
    """Multi-turn chats over a long document of their own (lognormal, median ``doc_median``
    tokens, at most ``max_doc``): every turn sends the document and the growing history and
    gets a long answer. Nothing is shared between conversations. The workload where long
    prefills land in the decode batches of mixed servers (what prefill/decode disaggregation
    is for), sized to fit an 8k context."""
    rng = random.Random(seed)
    w = Workload("long-chat", seed, duration, rate)
    for i, t0 in enumerate(_poisson_times(rng, rate, duration)):
        doc = f"[doc {i}] " + text(rng, _lognormal_tokens(rng, doc_median, doc_sigma, 500, max_doc))
        ts = [Turn(user=text(rng, rng.randint(*user_tokens)), max_tokens=rng.randint(*out_tokens),
                   think_s=rng.uniform(*think_s) if k else 0.0) for k in range(rng.randint(*turns))]
        for t in ts:
            t.answer = text(rng, t.max_tokens)
        w.conversations.append(Conversation(t0, doc, ts, -1, i))
    w.info.update(doc_median_tokens=doc_median, max_doc_tokens=max_doc)
    return w


def overhead(seed: int, duration: float, rate: float) -> Workload:
    """Tiny requests for near-instant backends: what remains is the gateway's own cost."""
    rng = random.Random(seed)
    w = Workload("overhead", seed, duration, rate)
    for i, t0 in enumerate(_poisson_times(rng, rate, duration)):
        w.conversations.append(Conversation(t0, None, [Turn(user=f"ping {i} " + text(rng, 200), max_tokens=1)], -1, i))
    return w


@dataclass(frozen=True)
class Spec:
    fn: Callable[..., Workload]
    stresses: str                      # one line for --help and the docs
    default_load: float = 0.5          # fraction of measured capacity when --loads is not given
    sim_args: tuple[str, ...] = ()     # simulator flags the workload needs (the user's --sim-args win)


WORKLOADS: dict[str, Spec] = {
    "shared-prefix": Spec(shared_prefix, "prefix-cache locality under cache pressure: more groups than one server "
                          "caches, Zipf popularity, long multi-turn", 0.9, ("--num-gpu-blocks", "8192")),
    "shared-prefix-small": Spec(shared_prefix_small, "prefix locality without pressure: 8 groups that fit every cache"),
    "no-sharing": Spec(no_sharing, "load balancing alone: unique prompts, lognormal lengths"),
    "no-sharing-heavy": Spec(no_sharing_heavy, "load balancing near saturation: heavy-tailed lengths, no sharing",
                             0.9),
    "bursty": Spec(bursty, "reaction to bursts: no-sharing traffic 2 s on, 4 s off"),
    "bursty-heavy": Spec(bursty_heavy, "overload in bursts (the gateway queue): heavy-tailed requests 2 s on, "
                         "4 s off", 1.3),
    "long-prompt": Spec(long_prompt, "body handling: 220 KB prompts", 0.5, ("--max-model-len", "131072")),
    "long-chat": Spec(long_chat, "prefill/decode: multi-turn chats over long documents of their own, long answers "
                      "(long prefills in decode batches)", 0.6),
    "overhead": Spec(overhead, "the gateway's own latency: tiny requests, near-instant backends", 0.5,
                     ("--time-scale", "0.001")),
}
REPLAYS = {"trace": "replay a Mooncake-format trace (timestamp, input_length, output_length, hash_ids)",
           "requests": "replay a JSONL log of OpenAI requests (t, body, session)"}


def describe(width: int = 100) -> str:
    import textwrap

    rows = [(n, s.stresses + (f" (default load {s.default_load:g})" if s.default_load != 0.5 else ""))
            for n, s in WORKLOADS.items()] + [(n + ":FILE", about) for n, about in REPLAYS.items()]
    return "\n".join(textwrap.fill(about, width, initial_indent=f"  {n:<23} ", subsequent_indent=" " * 26,
                                   break_on_hyphens=False) for n, about in rows)


def _coerce(value: str, default: Any) -> Any:
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes", "on")
    if isinstance(default, tuple):
        parts = [p for p in value.replace(":", ",").split(",") if p]
        return tuple(type(d)(p) for d, p in zip(default, parts))
    return type(default)(value) if default is not None else value


def make(name: str, seed: int, duration: float, rate: float, env: dict[str, Any] | None = None,
         params: dict[str, str] | None = None) -> Workload:
    try:
        spec = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}, trace:FILE, requests:FILE") \
            from None
    sig = inspect.signature(spec.fn).parameters
    kw: dict[str, Any] = {k: v for k, v in (env or {}).items() if k in sig and v is not None}
    for k, v in (params or {}).items():
        key = k.replace("-", "_")
        if key not in sig or key in ("seed", "duration", "rate"):
            raise ValueError(f"workload {name} has no parameter {k!r}; it has: "
                             f"{', '.join(p for p in sig if p not in ('seed', 'duration', 'rate'))}")
        kw[key] = _coerce(v, sig[key].default)
    return spec.fn(seed, duration, rate, **kw)


def mean_request_shape(w: Workload) -> tuple[float, float]:
    """(mean prompt tokens, mean output tokens) per request, for capacity estimates."""
    n, p, o = 0, 0, 0
    for c in w.conversations:
        for k, t in enumerate(c.turns):
            n += 1
            _, body = c.request(k)
            p += sum(len(m["content"]) for m in body.get("messages", [])) // CHARS_PER_TOKEN
            o += int(body.get("max_tokens") or t.max_tokens)
    return (p / n, o / n) if n else (0.0, 0.0)
