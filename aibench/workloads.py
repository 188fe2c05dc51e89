"""Seeded request schedules.

A workload is a list of *conversations* with start times. Conversations arrive open-loop
(on schedule, whether or not earlier ones finished); the turns of one conversation are
sequential, each sent after the previous answer plus a think time, with the history
growing as it would in a chat client. The same seed gives the same schedule and the same
texts for every system, so systems are compared on identical traffic.

Texts are synthetic but sized like real traffic: the simulator's tokenizer counts about
4 characters per token (docs/simulator.md), so lengths below are in tokens x 4 chars.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable

CHARS_PER_TOKEN = 4
_WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
          "sigma tau upsilon phi chi psi omega model token cache prefix route queue batch latency "
          "throughput request answer question system user assistant context window").split()


def text(rng: random.Random, tokens: int) -> str:
    """About ``tokens`` tokens of filler text (deterministic for a given RNG state)."""
    n = max(1, tokens * CHARS_PER_TOKEN)
    out, size = [], 0
    while size < n:
        w = rng.choice(_WORDS)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n]


@dataclass
class Turn:
    user: str
    max_tokens: int
    think_s: float = 0.0           # pause before this turn (after the previous answer)
    answer: str = ""               # the assistant text the next turn's history will carry


@dataclass
class Conversation:
    start_s: float
    system: str | None
    turns: list[Turn]
    group: int = -1                # shared-prefix group, -1 if none
    cid: int = 0

    def messages(self, upto: int) -> list[dict]:
        """The chat history sent with turn ``upto`` (0-based)."""
        msgs: list[dict] = []
        if self.system:
            msgs.append({"role": "system", "content": self.system})
        for t in self.turns[:upto]:
            msgs.append({"role": "user", "content": t.user})
            msgs.append({"role": "assistant", "content": t.answer})
        msgs.append({"role": "user", "content": self.turns[upto].user})
        return msgs


@dataclass
class Workload:
    name: str
    seed: int
    duration_s: float
    rate: float                    # conversations per second (mean)
    conversations: list[Conversation] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(len(c.turns) for c in self.conversations)


def _poisson_times(rng: random.Random, rate: float, duration: float) -> list[float]:
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return out
        out.append(t)


def _lognormal_tokens(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, rng.lognormvariate(math.log(median), sigma))))


def shared_prefix(seed: int, duration: float, rate: float, groups: int = 8, system_tokens: int = 2000,
                  turns: tuple[int, int] = (3, 6), user_tokens: tuple[int, int] = (40, 200),
                  out_tokens: tuple[int, int] = (40, 160), think_s: tuple[float, float] = (0.5, 2.0)) -> Workload:
    """Groups of users share long system prompts; multi-turn chats whose history grows."""
    rng = random.Random(seed)
    systems = [f"[group {g}] " + text(random.Random(seed * 1000 + g), system_tokens) for g in range(groups)]
    w = Workload("shared-prefix", seed, duration, rate)
    for i, t0 in enumerate(_poisson_times(rng, rate, duration)):
        g = rng.randrange(groups)
        ts = [Turn(user=text(rng, rng.randint(*user_tokens)), max_tokens=rng.randint(*out_tokens),
                   think_s=rng.uniform(*think_s) if k else 0.0) for k in range(rng.randint(*turns))]
        for t in ts:
            t.answer = text(rng, t.max_tokens)
        w.conversations.append(Conversation(t0, systems[g], ts, g, i))
    return w


def no_sharing(seed: int, duration: float, rate: float) -> Workload:
    """Unique single-turn prompts with heavy-tailed prompt and output lengths (lognormal,
    medians and spreads in the range public chat traces report)."""
    rng = random.Random(seed)
    w = Workload("no-sharing", seed, duration, rate)
    for i, t0 in enumerate(_poisson_times(rng, rate, duration)):
        w.conversations.append(_single(rng, i, t0))
    return w


def _single(rng: random.Random, i: int, t0: float) -> Conversation:
    p = _lognormal_tokens(rng, 400, 0.9, 16, 6000)
    o = _lognormal_tokens(rng, 120, 0.8, 4, 1024)
    return Conversation(t0, None, [Turn(user=f"[{i}] " + text(rng, p), max_tokens=o)], -1, i)


def bursty(seed: int, duration: float, rate: float, on_s: float = 2.0, off_s: float = 4.0) -> Workload:
    """``no-sharing`` traffic in on/off bursts with the same mean rate."""
    rng = random.Random(seed)
    w = Workload("bursty", seed, duration, rate)
    peak = rate * (on_s + off_s) / on_s
    t, i = 0.0, 0
    while t < duration:
        for dt in _poisson_times(rng, peak, min(on_s, duration - t)):
            w.conversations.append(_single(rng, i, t + dt))
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


def overhead(seed: int, duration: float, rate: float) -> Workload:
    """Tiny requests for near-instant backends: what remains is the gateway's own cost."""
    rng = random.Random(seed)
    w = Workload("overhead", seed, duration, rate)
    for i, t0 in enumerate(_poisson_times(rng, rate, duration)):
        w.conversations.append(Conversation(t0, None, [Turn(user=f"ping {i} " + text(rng, 200), max_tokens=1)], -1, i))
    return w


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "shared-prefix": shared_prefix,
    "no-sharing": no_sharing,
    "bursty": bursty,
    "long-prompt": long_prompt,
    "overhead": overhead,
}


def make(name: str, seed: int, duration: float, rate: float) -> Workload:
    try:
        fn = WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}") from None
    return fn(seed, duration, rate)


def mean_request_shape(w: Workload) -> tuple[float, float]:
    """(mean prompt tokens, mean output tokens) per request, for capacity estimates."""
    n, p, o = 0, 0, 0
    for c in w.conversations:
        for k, t in enumerate(c.turns):
            n += 1
            p += sum(len(m["content"]) for m in c.messages(k)) // CHARS_PER_TOKEN
            o += t.max_tokens
    return (p / n, o / n) if n else (0.0, 0.0)
