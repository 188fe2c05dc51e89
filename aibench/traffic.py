"""What a workload is: conversations made of turns, each turn one HTTP request.

Synthetic workloads (``workloads.py``) build chat turns whose history grows; replays
(``replay.py``) carry the recorded body of each request, or build it when it is sent (a
trace's text from its block hash ids), and an absolute arrival time. The load generator
only asks a conversation for ``request(k)``: the path and JSON body of turn ``k``.

Texts are synthetic but sized like real traffic: the simulator's tokenizer counts exactly
4 characters per token on lowercase text (docs/simulator.md), so lengths are tokens x 4
characters.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Any, Callable

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
CHARS_PER_TOKEN = 4
# Chat-template tokens (role markers, newlines) kept free when capping prompts: per message,
# and once for the generation prompt (the simulator's template: 5-6 and 6).
TEMPLATE_TOKENS_PER_MESSAGE = 6
GENERATION_PROMPT_TOKENS = 6
_WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
          "sigma tau upsilon phi chi psi omega model token cache prefix route queue batch latency "
          "throughput request answer question system user assistant context window").split()


def text(rng: random.Random, tokens: int) -> str:
    """About ``tokens`` tokens of lowercase filler text (deterministic for a given RNG state)."""
    n = max(1, tokens * CHARS_PER_TOKEN)
    out, size = [], 0
    while size < n:
        w = rng.choice(_WORDS)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n]


@dataclass
class Turn:
    user: str = ""
    max_tokens: int = 16
    think_s: float = 0.0           # pause before this turn (after the previous answer)
    answer: str = ""               # the assistant text the next turn's history carries
    at_s: float | None = None      # replay: arrival, seconds after the run's start
    body: dict | None = None       # replay: the request body as recorded
    build: Callable[[], dict] | None = None  # replay: builds the body when it is sent
    path: str = CHAT
    ref: int | None = None         # replay: line (request log) or row (trace) in the file, 1-based


@dataclass
class Conversation:
    start_s: float
    system: str | None
    turns: list[Turn]
    group: int = -1                # shared-prefix group, -1 if none
    cid: int = 0
    session: str | None = None     # replay: the recorded session id

    def messages(self, upto: int) -> list[dict]:
        """The chat history sent with turn ``upto`` (0-based) of a synthetic conversation."""
        msgs: list[dict] = []
        if self.system:
            msgs.append({"role": "system", "content": self.system})
        for t in self.turns[:upto]:
            msgs.append({"role": "user", "content": t.user})
            msgs.append({"role": "assistant", "content": t.answer})
        msgs.append({"role": "user", "content": self.turns[upto].user})
        return msgs

    def request(self, k: int, max_prompt_tokens: int | None = None) -> tuple[str, dict]:
        """(path, body) of turn ``k``, without ``model`` and streaming fields (the load
        generator sets those), its prompt cut to ``max_prompt_tokens`` if given."""
        t = self.turns[k]
        if t.build is not None:
            body = t.build()
        elif t.body is not None:
            body = copy.deepcopy(t.body)
        else:
            body = {"messages": self.messages(k), "max_tokens": t.max_tokens}
        if max_prompt_tokens:
            cap_prompt(body, max_prompt_tokens)
        return t.path, body


@dataclass
class Workload:
    name: str
    seed: int
    duration_s: float              # conversations start (replays: requests arrive) within this
    rate: float                    # conversations per second (mean)
    conversations: list[Conversation] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # facts for the report (groups, speed, ...)

    @property
    def requests(self) -> int:
        return sum(len(c.turns) for c in self.conversations)

    @property
    def replay(self) -> bool:
        return any(t.at_s is not None for c in self.conversations[:1] for t in c.turns)


def cap_prompt(body: dict, max_tokens: int) -> bool:
    """Cut the prompt of a chat or completions body to about ``max_tokens`` tokens, in
    place, keeping its beginning (so requests that shared a prefix still share it): later
    messages are dropped, the one at the boundary is truncated. Returns whether it cut."""
    if isinstance(body.get("prompt"), str):
        n = max(1, max_tokens * CHARS_PER_TOKEN)
        if len(body["prompt"]) > n:
            body["prompt"] = body["prompt"][:n]
            return True
        return False
    if isinstance(body.get("prompt"), list) and body["prompt"] and isinstance(body["prompt"][0], int):
        if len(body["prompt"]) > max_tokens:
            body["prompt"] = body["prompt"][:max(1, max_tokens)]
            return True
        return False
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        return False
    left = (max_tokens - GENERATION_PROMPT_TOKENS) * CHARS_PER_TOKEN
    out: list = []
    cut = False
    for m in msgs:
        left -= TEMPLATE_TOKENS_PER_MESSAGE * CHARS_PER_TOKEN
        c = m.get("content") if isinstance(m, dict) else None
        size = len(c) if isinstance(c, str) else 0
        if left <= 0 and out:
            cut = True
            break
        if isinstance(c, str) and size > left:
            out.append({**m, "content": c[:max(left, CHARS_PER_TOKEN)]})
            cut = True
            break
        out.append(m)
        left -= size
    if cut:
        body["messages"] = out
    return cut
