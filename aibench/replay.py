"""Replays: a Mooncake-format trace (``trace:FILE``) or a log of real OpenAI requests
(``requests:FILE``), at their recorded arrival times after the time options.

**Trace** (the format of kvcache-ai/Mooncake's FAST'25 traces): one JSON object per line,
``timestamp`` (ms since the first request), ``input_length`` and ``output_length``
(tokens), ``hash_ids`` (one id per 512-token block of the prompt; equal ids = a shared
prefix). Each row becomes one chat request whose single user message is the
concatenation of one text block per hash id: a block's text depends only on its id, so
rows that share ids share their text and prefix sharing is reproduced exactly. Blocks are
lowercase text, which the simulator's tokenizer cuts into exactly 4 characters per token,
so a block of B tokens is 4 x B characters. ``token_scale`` shrinks every block, prompt
and output alike (0.25: 128-token blocks); the harness scales the simulator's KV capacity
by the same factor. Requests ask ``ignore_eos`` so that real engines generate the trace's
output length, as vLLM's own benchmarks do.

**Request log**: one JSON object per line, ``t`` (arrival: seconds as a number, or an
ISO-8601 time), ``body`` (the request body as sent), optional ``session`` (requests of one
session are one conversation: sent in order, a request never before the previous one's
answer) and optional ``path`` (default: chat for a body with ``messages``, else
completions). The body is sent as recorded except ``model`` (set to the backends' model)
and ``stream``/``stream_options`` (always streamed, with usage, so TTFT is measured).

**Time options** (both kinds): ``window`` keeps the part of the recording between two
offsets (seconds after its first request); ``sample`` keeps that fraction of the rows
(request logs: of the sessions), seeded; ``speed`` replays that many times faster than
recorded (default: whatever makes the mean rate the one asked for); ``duration`` cuts the
replay after that many seconds of wall time.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .traffic import CHAT, CHARS_PER_TOKEN, COMPLETIONS, Conversation, Turn, Workload, text

TRACE_BLOCK_TOKENS = 512


@dataclass
class ReplayOptions:
    window: tuple[float, float] | None = None
    sample: float = 1.0
    speed: float | None = None
    duration: float | None = None
    token_scale: float = 1.0


def parse_window(s: str | None) -> tuple[float, float] | None:
    if not s:
        return None
    a, _, b = s.partition(":")
    lo, hi = float(a or 0), float(b) if b else float("inf")
    if hi <= lo:
        raise ValueError(f"--replay-window {s!r}: END must be after START")
    return lo, hi


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                doc = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(doc, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object")
            rows.append((n, doc))
    if not rows:
        raise ValueError(f"{path}: no requests")
    return rows


def _window(items: list[tuple[float, Any]], opts: ReplayOptions) -> tuple[list[tuple[float, Any]], float]:
    """Items (time, x) re-based to the window's start, and the span of recording they cover."""
    t0 = min(t for t, _ in items)
    items = [(t - t0, x) for t, x in items]
    last = max(t for t, _ in items)
    if not opts.window:
        return items, last
    lo, hi = opts.window
    return [(t - lo, x) for t, x in items if lo <= t < hi], max(0.0, min(hi, last) - lo)


def _finish(name: str, seed: int, rate: float, convs: list[Conversation], span: float, opts: ReplayOptions,
            info: dict) -> Workload:
    if not convs:
        raise ValueError(f"{name}: nothing left to replay after the window and sampling options")
    recorded_rate = len(convs) / span if span > 0 else 0.0
    speed = opts.speed or (rate / recorded_rate if recorded_rate > 0 and rate > 0 else 1.0)
    for c in convs:
        for t in c.turns:
            t.at_s = (t.at_s or 0.0) / speed
        c.start_s = c.turns[0].at_s or 0.0
    if opts.duration is not None:
        for c in convs:
            c.turns = [t for t in c.turns if (t.at_s or 0.0) <= opts.duration]
        convs = [c for c in convs if c.turns]
    duration = opts.duration if opts.duration is not None else max(c.turns[-1].at_s or 0.0 for c in convs)
    w = Workload(name, seed, duration, len(convs) / max(duration, 1e-9), convs)
    w.info.update(info, speed=round(speed, 4), recorded_span_s=round(span, 3), requests=w.requests,
                  conversations=len(convs), window=list(opts.window) if opts.window else None, sample=opts.sample)
    return w


# -- Mooncake traces ------------------------------------------------------------------------
class BlockText:
    """The text of a trace block: a lowercase tag naming its hash id, then a slice of a
    seeded corpus chosen by the id. Depends on the id only, so equal ids are equal text."""

    def __init__(self, block_tokens: int, seed: int = 0) -> None:
        self.chars = block_tokens * CHARS_PER_TOKEN
        self.corpus = text(random.Random(seed), (1 << 18) + block_tokens)
        self.cache: dict[int, str] = {}

    @staticmethod
    def tag(hid: int) -> str:
        s = "q"
        hid = int(hid)
        while True:
            hid, r = divmod(hid, 26)
            s += chr(97 + r)
            if not hid:
                return s + " "

    def block(self, hid: int) -> str:
        b = self.cache.get(hid)
        if b is None:
            tag = self.tag(hid)
            off = (int(hid) * 2654435761) % (len(self.corpus) - self.chars)
            b = (tag + self.corpus[off:off + self.chars])[:self.chars]
            if len(self.cache) < 200_000:
                self.cache[hid] = b
        return b

    def prompt(self, hash_ids: list[int], tokens: int) -> str:
        return "".join(self.block(h) for h in hash_ids)[:tokens * CHARS_PER_TOKEN]


def scaled_lengths(row: dict, scale: float) -> tuple[int, int, int]:
    """(block tokens, prompt tokens, output tokens) of a trace row after token scaling."""
    b = max(4, round(TRACE_BLOCK_TOKENS * scale))
    n = len(row["hash_ids"])
    p = round(int(row["input_length"]) * scale)
    p = min(max(p, (n - 1) * b + 1), n * b) if n else max(1, p)
    return b, p, max(1, round(int(row["output_length"]) * scale))


def trace_workload(path: str | Path, seed: int, rate: float, opts: ReplayOptions) -> Workload:
    path = Path(path)
    rows = _read_jsonl(path)
    for n, r in rows:
        missing = {"timestamp", "input_length", "output_length", "hash_ids"} - set(r)
        if missing:
            raise ValueError(f"{path}:{n}: not a Mooncake trace row (missing {', '.join(sorted(missing))})")
    items, span = _window([(float(r["timestamp"]) / 1000.0, (n, r)) for n, r in rows], opts)
    rng = random.Random(seed)
    items = [it for it in items if opts.sample >= 1.0 or rng.random() < opts.sample]
    blocks = BlockText(max(4, round(TRACE_BLOCK_TOKENS * opts.token_scale)), seed=0)
    convs = []
    max_len = 0
    for t, (n, r) in items:
        b, p, o = scaled_lengths(r, opts.token_scale)
        max_len = max(max_len, p + o)
        ids = list(r["hash_ids"])

        def build(ids: list[int] = ids, p: int = p, o: int = o) -> dict:
            return {"messages": [{"role": "user", "content": blocks.prompt(ids, p)}], "max_tokens": o,
                    "ignore_eos": True}

        convs.append(Conversation(t, None, [Turn(max_tokens=o, at_s=t, build=build, ref=n)], -1, n - 1))
    return _finish(f"trace:{path.name}", seed, rate, convs, span, opts,
                   {"file": str(path), "token_scale": opts.token_scale,
                    "block_tokens": max(4, round(TRACE_BLOCK_TOKENS * opts.token_scale)),
                    "max_request_tokens": max_len})


def predicted_hits(rows: list[dict], scale: float, engine_block: int = 16, prefix_tokens: int = 5,
                   suffix_tokens: int = 6) -> int:
    """Prompt tokens an unbounded prefix cache on one server hits for these trace rows sent
    in order: per row, the leading blocks (hash ids) an earlier row had, counted in full
    engine blocks, never the whole prompt (vLLM always computes the last token). The chat
    template adds ``prefix_tokens`` before the text and ``suffix_tokens`` after it."""
    seen: dict[tuple, int] = {}  # chain of leading ids -> tokens of its last block some row sent
    hits = 0
    for r in rows:
        b, p, _ = scaled_lengths(r, scale)
        ids = tuple(r["hash_ids"])
        shared = 0
        for i in range(len(ids)):
            have = seen.get(ids[:i + 1], 0)
            shared += min(have, p - i * b)
            if have < b:
                break
        total = prefix_tokens + p + suffix_tokens
        hits += min(prefix_tokens + shared, total - 1) // engine_block * engine_block if shared else 0
        for i in range(len(ids)):
            key = ids[:i + 1]
            seen[key] = max(seen.get(key, 0), min(b, p - i * b))
    return hits


# -- request logs -----------------------------------------------------------------------------
def _time(v: Any, where: str) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str):
        try:
            return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    raise ValueError(f"{where}: 't' must be seconds (a number) or an ISO-8601 time, got {v!r}")


def requests_workload(path: str | Path, seed: int, rate: float, opts: ReplayOptions) -> Workload:
    path = Path(path)
    items = []
    for n, doc in _read_jsonl(path):
        where = f"{path}:{n}"
        body = doc.get("body")
        if not isinstance(body, dict) or not ("messages" in body or "prompt" in body):
            raise ValueError(f"{where}: 'body' must be a chat (messages) or completions (prompt) request body")
        if "t" not in doc:
            raise ValueError(f"{where}: missing 't' (arrival time)")
        sess = doc.get("session")
        items.append((_time(doc["t"], where), (n, body, None if sess is None else str(sess), doc.get("path"))))
    items.sort(key=lambda it: (it[0], it[1][0]))
    items, span = _window(items, opts)
    rng = random.Random(seed)
    keep: dict[str, bool] = {}
    convs: list[Conversation] = []
    by_session: dict[str, Conversation] = {}
    for t, (n, body, sess, p) in items:
        key = sess if sess is not None else f"\0{n}"
        if key not in keep:
            keep[key] = opts.sample >= 1.0 or rng.random() < opts.sample
        if not keep[key]:
            continue
        path_ = p or (CHAT if "messages" in body else COMPLETIONS)
        turn = Turn(max_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or 16), at_s=t,
                    body=body, path=path_, ref=n)
        c = by_session.get(sess) if sess is not None else None
        if c is None:
            c = Conversation(t, None, [], -1, len(convs), session=sess)
            convs.append(c)
            if sess is not None:
                by_session[sess] = c
        c.turns.append(turn)
    return _finish(f"requests:{path.name}", seed, rate, convs, span, opts,
                   {"file": str(path), "sessions": len(by_session)})


def make(name: str, seed: int, rate: float, opts: ReplayOptions) -> Workload:
    kind, _, file = name.partition(":")
    if not file:
        raise ValueError(f"{name!r}: name the file, e.g. {kind}:path/to/file.jsonl")
    if kind == "trace":
        return trace_workload(file, seed, rate, opts)
    if kind == "requests":
        if opts.token_scale != 1.0:
            raise ValueError("--trace-token-scale applies to trace:FILE only")
        return requests_workload(file, seed, rate, opts)
    raise ValueError(f"unknown replay kind {kind!r}: trace:FILE or requests:FILE")


def is_replay(name: str) -> bool:
    return name.split(":", 1)[0] in ("trace", "requests") and ":" in name
