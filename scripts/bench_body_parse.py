"""Body parsing cost: RequestContext.json() (orjson + depth check) against json.loads on a ~226 KB chat body.

Run: .venv/bin/python scripts/bench_body_parse.py (numbers in docs/benchmarks.md)."""
import json, timeit
from extproc.core.context import RequestContext
msgs = [{"role": "system", "content": "You are a helpful assistant. " * 2000}] + [
    {"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 430 + str(i)} for i in range(80)]
body = json.dumps({"model": "m", "messages": msgs, "max_tokens": 16}).encode()
def ctx_json():
    c = RequestContext("r"); c.body = body; return c.json()
n = 2000
for name, f in (("json.loads", lambda: json.loads(body)), ("RequestContext.json (orjson + depth check)", ctx_json)):
    best = min(timeit.repeat(f, number=n, repeat=5)) / n
    print(f"{len(body) / 1024:.0f} KB body, {name}: {best * 1e6:.0f} µs")
