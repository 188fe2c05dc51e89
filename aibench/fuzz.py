"""Request-body fuzzing through the real Envoy to ai-lb: ``python -m aibench.fuzz``.

Seeded request bodies of every broken and odd kind (malformed and truncated JSON, deep
nesting, huge strings, wrong types, invalid UTF-8, lone surrogates, random bytes, valid but
weird chat and completions shapes) are POSTed through the reference Envoy to a route whose
policy reads the body (``prefix_cache``), with simulated backends behind it. Reported:
ai-lb crashes (the process gone), hangs (a request not answered within ``--timeout``),
Envoy's ext_proc timeouts and failures, ai-lb's fallbacks by reason, and ai-lb's RSS after
warm-up and at the end. Exit status 0 with no crash, no hang, no ``policy_error``. Bounded
in count and time, loopback only; everything started here is stopped in ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from . import devstack as ds

MODEL = "sim-model"
_HUGE = {}  # size -> bytes, built once


def _huge(n: int) -> str:
    if n not in _HUGE:
        _HUGE[n] = ("lorem ipsum dolor sit amet " * (n // 27 + 1))[:n]
    return _HUGE[n]


def _chat(content: object, **extra: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 1, **extra}


def _valid(rng: random.Random) -> bytes:
    turns = [{"role": rng.choice(("system", "user", "assistant")), "content": f"hello {rng.random()}"}
             for _ in range(rng.randint(1, 6))]
    return json.dumps({"model": MODEL, "messages": turns, "max_tokens": 1}).encode()


def malformed(rng: random.Random) -> bytes:
    b = _valid(rng)
    cut = rng.randint(0, len(b) - 1)
    return rng.choice((b[:cut], b[:cut] + b"}" * rng.randint(0, 3), b.replace(b'"', b"'", 1),
                       b.replace(b":", b"", 1), b"{" + b[1:].replace(b",", b",,", 1), b"{,}", b"[", b"nul",
                       b'{"model": "m" "messages": []}', b'{"a": 1}' * 3))


def deep(rng: random.Random) -> bytes:
    d = rng.choice((64, 127, 128, 129, 500, 1023, 1024, 1025, 5000, 20000, 100000))
    kind = rng.choice(("arr", "obj", "content", "mixed"))
    if kind == "arr":
        return b"[" * d + b"]" * d
    if kind == "obj":
        return b'{"a":' * d + b"1" + b"}" * d
    inner = b"[" * d + b"]" * d if kind == "content" else (b'[{"x":' * (d // 2) + b"0" + b"}]" * (d // 2))
    return b'{"model":"' + MODEL.encode() + b'","messages":[{"role":"user","content":' + inner + b"}]}"


def huge(rng: random.Random) -> bytes:
    n = rng.choice((64 * 1024, 256 * 1024, 1024 * 1024, 3 * 1024 * 1024, 9 * 1024 * 1024))
    where = rng.choice(("content", "model", "key", "system"))
    if where == "content":
        doc = _chat(_huge(n))
    elif where == "model":
        doc = {"model": _huge(n), "messages": [], "max_tokens": 1}
    elif where == "key":
        doc = {_huge(n): 1, "model": MODEL}
    else:
        doc = {"model": MODEL, "messages": [{"role": "system", "content": _huge(n)}, {"role": "user", "content": "hi"}]}
    return json.dumps(doc).encode()


def wrong_types(rng: random.Random) -> bytes:
    shapes: list[object] = [
        {"model": MODEL, "messages": "hello"}, {"model": MODEL, "messages": 42}, {"model": MODEL, "messages": None},
        {"model": MODEL, "messages": [1, 2, 3]}, {"model": MODEL, "messages": [None]}, {"model": MODEL, "messages": {}},
        {"model": MODEL, "messages": [{"role": 7, "content": "x"}]}, {"model": MODEL, "messages": [{"content": "x"}]},
        {"model": MODEL, "messages": [{"role": "user", "content": 3.5}]},
        {"model": MODEL, "messages": [{"role": "user", "content": [1, "a", None, {"type": 5}]}]},
        {"model": ["m"], "messages": []}, {"model": None}, {"model": {"a": 1}, "prompt": 7},
        {"model": MODEL, "prompt": [[1, 2], [3]]}, {"model": MODEL, "prompt": [None, {}]}, {"model": MODEL, "prompt": True},
        {"model": MODEL, "messages": [], "max_tokens": "lots"}, {"model": MODEL, "stream": "yes", "messages": []},
        [], "just a string", 12345, None, True,
    ]
    return json.dumps(rng.choice(shapes)).encode()


def bad_utf8(rng: random.Random) -> bytes:
    junk = bytes(rng.choice((0x80, 0xC0, 0xC1, 0xF5, 0xFF, 0xFE, 0xED)) for _ in range(rng.randint(1, 8)))
    return b'{"model":"' + MODEL.encode() + b'","messages":[{"role":"user","content":"' + junk + b'"}]}'


def surrogates(rng: random.Random) -> bytes:
    s = rng.choice((b"\\ud800", b"\\udfff", b"\\ud83d", b"\\udc00\\ud800", b"\xed\xa0\x80", b"\\ud83d\\ude00"))
    field = rng.choice(("content", "role", "model"))
    if field == "model":
        return b'{"model":"' + s + b'","messages":[]}'
    if field == "role":
        return b'{"model":"m","messages":[{"role":"' + s + b'","content":"x"}]}'
    return b'{"model":"m","messages":[{"role":"user","content":"a' + s + b'b"}]}'


def random_bytes(rng: random.Random) -> bytes:
    return rng.randbytes(rng.choice((0, 1, 2, 16, 100, 1000, 10000)))


def weird_valid(rng: random.Random) -> bytes:
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"t{i}"} for i in range(rng.choice((0, 1, 1000, 5000)))]
    shapes: list[object] = [
        {"model": MODEL, "messages": []}, {"model": MODEL, "messages": many},
        {"model": MODEL, "messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                                                           "function": {"name": "f", "arguments": "{}"}}]}]},
        _chat([{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]),
        _chat("emoji \U0001f600 \u0000 nul and \u2028 separators"), _chat("x", n=1e308, temperature=-0.0),
        _chat("x", seed=123456789012345678901234567890), {"model": MODEL, "messages": [{"role": "x" * 10000, "content": ""}]},
        {"model": MODEL, "prompt": "complete me"}, {"model": MODEL, "prompt": ["a", "b"] * 100},
        {"model": MODEL, "prompt": list(range(2000))}, {"model": "", "messages": [{"role": "user", "content": ""}]},
        {"messages": [{"role": "user", "content": "no model"}]}, {},
        {"model": MODEL, "messages": [{"role": "user", "content": "dup"}], "messages2": 1, "extra": {"deep": [[[]]]}},
    ]
    doc = rng.choice(shapes)
    b = json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode()
    return b.replace(b'"model"', b'"model": "dup", "model"', 1) if rng.random() < 0.1 else b


KINDS: dict[str, tuple[Callable[[random.Random], bytes], float]] = {
    "malformed": (malformed, 0.2), "deep": (deep, 0.1), "huge": (huge, 0.002), "wrong_types": (wrong_types, 0.15),
    "bad_utf8": (bad_utf8, 0.1), "surrogates": (surrogates, 0.1), "random_bytes": (random_bytes, 0.1),
    "weird_valid": (weird_valid, 0.148), "valid": (_valid, 0.1),
}


def bodies(seed: int, n: int):
    rng = random.Random(seed)
    names = list(KINDS)
    weights = [KINDS[k][1] for k in names]
    for _ in range(n):
        kind = rng.choices(names, weights)[0]
        yield kind, KINDS[kind][0](rng), rng.choice(("/v1/chat/completions", "/v1/chat/completions", "/v1/completions"))


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Stats:
    def __init__(self) -> None:
        self.sent = 0
        self.by_kind: dict[str, int] = {}
        self.status: dict[int, int] = {}
        self.errors: dict[str, int] = {}
        self.hangs: dict[str, int] = {}
        self.max_latency_s = 0.0


async def _drive(url: str, n: int, seed: int, concurrency: int, timeout: float, stats: Stats,
                 tick: Callable[[], None]) -> None:
    import aiohttp

    it = bodies(seed, n)

    async def worker(s: aiohttp.ClientSession) -> None:
        for kind, body, path in it:
            t0 = time.monotonic()
            try:
                async with s.post(url + path, data=body, headers={"content-type": "application/json"},
                                  timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                    await r.read()
                    stats.status[r.status] = stats.status.get(r.status, 0) + 1
            except asyncio.TimeoutError:
                stats.hangs[kind] = stats.hangs.get(kind, 0) + 1
            except Exception as e:  # noqa: BLE001 - counted
                stats.errors[type(e).__name__] = stats.errors.get(type(e).__name__, 0) + 1
            stats.max_latency_s = max(stats.max_latency_s, time.monotonic() - t0)
            stats.sent += 1
            stats.by_kind[kind] = stats.by_kind.get(kind, 0) + 1
            if stats.sent % 1000 == 0:
                tick()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))


def _envoy_ext_proc_stats(admin: int) -> dict[str, int]:
    _, text = ds.http_get(f"http://127.0.0.1:{admin}/stats?filter=ext_proc", timeout=2)
    out = {}
    for line in text.splitlines():
        k, _, v = line.partition(": ")
        if k.startswith("http.llm.ext_proc.") and v.strip().isdigit():
            out[k.removeprefix("http.llm.ext_proc.")] = int(v)
    return out


def _fallbacks(metrics_port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    _, text = ds.http_get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2)
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "ai_lb_fallbacks_total":
                out[s.labels["reason"]] = out.get(s.labels["reason"], 0) + s.value
            elif s.name == "ai_lb_decisions_total" and s.labels.get("outcome") == "picked":
                out["(picked)"] = out.get("(picked)", 0) + s.value
            elif s.name == "ai_lb_requests_skipped_total":
                out["(skipped)"] = out.get("(skipped)", 0) + s.value
    return out


def run(n: int, seed: int = 1, concurrency: int = 32, timeout: float = 10.0, quiet: bool = False,
        max_local_entries: int = 10_000) -> dict:
    """Start the stack, send ``n`` bodies, stop everything; returns the numbers.

    ``max_local_entries`` bounds prefix_cache's memory index (an LRU; the policy's default
    is 100,000): small enough that it is full within the warm-up, so RSS after the warm-up
    measures leaks, not a bounded cache still filling."""
    tmp = Path(tempfile.mkdtemp(prefix="ai-lb-fuzz-"))
    backends = ds.free_ports(3)
    listen, admin, grpc, metrics = ds.free_ports(4)
    ports = ds.EnvoyPorts(listen, admin, grpc)
    procs: list[ds.Proc] = []
    stats = Stats()
    rss: dict[str, int] = {}
    series: list[tuple[int, int]] = []  # (bodies sent, RSS kB)
    try:
        procs.append(ds.start_sim(tmp, backends, "--model", MODEL, "--time-scale", "0.001", "--admin-port", "-1"))
        procs.append(ds.start_envoy(tmp, ports, backends))
        ds.wait_cluster_healthy(admin, "llm_backends", 3, timeout=20)
        cfg = ds.write_ai_lb_config(tmp / "ai-lb.yaml", grpc, metrics,
                                    {"llm": {"lb_policy": "prefix_cache", "lb_config": {"max_local_entries": max_local_entries},
                                             "endpoints": {"cluster": "llm_backends"}}},
                                    envoy_admin_port=admin, server={"fallback_log_interval": 10.0})
        ai = ds.start_ai_lb(tmp, cfg, grpc)
        procs.append(ai)
        deadline = time.monotonic() + 15
        while not all(ds.envoy_host_health(admin, "ai_lb").values() or [False]) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # first discovery
        t0 = time.monotonic()
        # Warm-up: the first 10 %. ai-lb's state grows until then and is bounded after (the
        # prefix index is an LRU of max_local_entries), so RSS is compared from there on.
        warm = max(1, n // 10)

        def tick() -> None:
            if not ai.alive():
                raise RuntimeError(f"ai-lb exited with {ai.p.returncode}")
            if "after_warmup" not in rss and stats.sent >= warm:
                rss["after_warmup"] = rss_kb(ai.p.pid)
            rss["max"] = max(rss.get("max", 0), rss_kb(ai.p.pid))
            if stats.sent % max(1000, n // 10) == 0:
                series.append((stats.sent, rss_kb(ai.p.pid)))
            if not quiet and stats.sent % 10000 == 0:
                print(f"  {stats.sent}/{n} bodies, {time.monotonic() - t0:.0f} s, ai-lb RSS {rss_kb(ai.p.pid) / 1024:.1f} MB",
                      flush=True)

        url = f"http://127.0.0.1:{listen}"
        asyncio.run(_drive(url, n, seed, concurrency, timeout, stats, tick))
        elapsed = time.monotonic() - t0
        time.sleep(1.0)
        crashed = not ai.alive()
        rss["end"] = 0 if crashed else rss_kb(ai.p.pid)
        rss.setdefault("after_warmup", rss["end"])
        ext = _envoy_ext_proc_stats(admin)
        fb = {} if crashed else _fallbacks(metrics)
    finally:
        for p in reversed(procs):
            p.stop(timeout=3)
    growth = (rss["end"] - rss["after_warmup"]) / rss["after_warmup"] if rss["after_warmup"] else 0.0
    return {"bodies": stats.sent, "seconds": round(elapsed, 1), "ai_lb_crashed": crashed,
            "hangs": sum(stats.hangs.values()), "hangs_by_kind": stats.hangs, "client_errors": stats.errors,
            "max_latency_s": round(stats.max_latency_s, 3), "statuses": stats.status, "by_kind": stats.by_kind,
            "envoy_ext_proc": ext, "ai_lb_outcomes": fb, "rss_kb": rss, "rss_growth": round(growth, 4),
            "rss_series_kb": series,
            "logs": str(tmp)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aibench.fuzz", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Request-body fuzzing through Envoy to ai-lb (see the module docstring).")
    p.add_argument("--bodies", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds a request may take before it counts as a hang")
    p.add_argument("--max-local-entries", type=int, default=10_000,
                   help="prefix_cache's memory index bound (full within the warm-up, so RSS growth means a leak)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)
    r = run(a.bodies, a.seed, a.concurrency, a.timeout, max_local_entries=a.max_local_entries)
    ext, rss = r["envoy_ext_proc"], r["rss_kb"]
    print(f"{r['bodies']} bodies in {r['seconds']} s ({r['bodies'] / max(r['seconds'], 1e-9):.0f}/s), seed {a.seed}")
    print("  kinds: " + ", ".join(f"{k} {v}" for k, v in sorted(r["by_kind"].items())))
    print(f"  ai-lb crashed: {'YES' if r['ai_lb_crashed'] else 'no'}; hangs (no answer within {a.timeout:g} s): "
          f"{r['hangs']}; slowest answer {r['max_latency_s'] * 1000:.0f} ms; client errors: {r['client_errors'] or 'none'}")
    print("  HTTP statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items())))
    print("  Envoy ext_proc: " + ", ".join(f"{k} {ext.get(k, 0)}" for k in
                                            ("streams_started", "streams_failed", "message_timeouts", "failure_mode_allowed")))
    print("  ai-lb: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["ai_lb_outcomes"].items())))
    print(f"  ai-lb RSS: {rss['after_warmup'] / 1024:.1f} MB after warm-up, {rss.get('max', 0) / 1024:.1f} MB max, "
          f"{rss['end'] / 1024:.1f} MB at the end ({r['rss_growth'] * 100:+.1f} % from warm-up)")
    print("  ai-lb RSS by bodies sent: " + ", ".join(f"{k // 1000}k {v / 1024:.0f} MB" for k, v in r["rss_series_kb"]))
    if a.json:
        a.json.write_text(json.dumps(r, indent=2))
    ok = not r["ai_lb_crashed"] and r["hangs"] == 0 and not r["ai_lb_outcomes"].get("policy_error")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
