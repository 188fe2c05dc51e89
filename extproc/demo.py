"""``ai-lb demo``: the whole product on loopback in a few seconds, no setup needed.

It starts simulated vLLM servers, the real Envoy from the reference ``envoy/envoy.yaml``
(rendered by ``extproc.devstack``, as for the end-to-end tests) and ai-lb, then sends chat
traffic through Envoy and prints where each request went. Three phases, one claim each:

1. ai-lb on: the configured policy (least_request by default) picks every endpoint;
   the same traffic on ``/native/`` (ai-lb off for that route) shows Envoy's round robin.
2. live policy switch: the config file is rewritten to round_robin; ai-lb reloads it
   without a restart and sequential requests start rotating.
3. fail-open: ai-lb is killed; requests still succeed, balanced natively by Envoy.

Exit status: 0 when every request succeeded, ai-lb made the decisions and the switch took
effect; 1 otherwise; 130 on Ctrl-C, 143 on SIGTERM. Everything started here is stopped
in ``finally``; the logs stay in a temp dir, printed last.
"""

from __future__ import annotations

import asyncio
import json
import signal
import string
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import devstack as ds

MODEL = "demo-model"
CHAT = "/v1/chat/completions"
CONCURRENCY = 6
REQUEST_TIMEOUT_S = 10.0  # per request; a phase is bounded by PHASE_TIMEOUT_S
PHASE_TIMEOUT_S = 25.0
MAX_TOKENS = (8, 96, 16, 160, 4, 48)  # varied lengths: least_request has uneven load to balance


# -- the stack --------------------------------------------------------------------------
@dataclass
class Stack:
    """Every process the demo started, plus what is needed to reach and reconfigure them."""

    tmp: Path
    backend_ports: list[int]
    names: dict[str, str]  # "127.0.0.1:port" -> backend name (the x-sim-server value)
    envoy_ports: ds.EnvoyPorts
    metrics_port: int
    config_path: Path
    procs: list[ds.Proc] = field(default_factory=list)
    ai_lb: ds.Proc | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.envoy_ports.listen}"

    def write_config(self, policy: str) -> None:
        """Write ai-lb's config: one route ``llm`` (Envoy's route name), hosts discovered from Envoy."""
        routes = {"llm": {"lb_policy": policy, "endpoints": {"cluster": "llm_backends"}}}
        ds.write_ai_lb_config(self.config_path, self.envoy_ports.ai_lb, self.metrics_port, routes,
                              envoy_admin_port=self.envoy_ports.admin)

    def stop(self) -> None:
        """Stop in reverse start order; a process that is already gone is fine."""
        for p in reversed(self.procs):
            try:
                p.stop(timeout=3)
            except BaseException:  # noqa: BLE001 - a second Ctrl-C must not leave processes behind
                if p.alive():
                    p.p.kill()


def backend_names(n: int) -> list[str]:
    return [f"vllm-{string.ascii_lowercase[i]}" for i in range(n)]


def start_stack(tmp: Path, policy: str, backends: int, time_scale: float) -> Stack:
    """Start simulator, Envoy and ai-lb, and wait until requests through Envoy reach ai-lb's pick.

    Each process is recorded in ``st.procs`` the moment it is spawned, before waiting for it
    to come up, so a Ctrl-C during start-up still stops it.
    """
    names = backend_names(backends)
    ports = ds.free_ports(backends + 4)
    bports, (listen, admin, grpc, metrics) = ports[:backends], ports[backends:]
    st = Stack(tmp, bports, {f"127.0.0.1:{p}": n for p, n in zip(bports, names)},
               ds.EnvoyPorts(listen, admin, grpc), metrics, tmp / "ai-lb.yaml")
    try:
        step(f"starting {backends} simulated vLLM servers ({', '.join(names)}), time scale {time_scale}")
        sim = launch(st, "sim", [ds.PY, "-m", "vllmsim", "serve", "--ports", ",".join(map(str, bports)),
                                 "--names", ",".join(names), "--model", MODEL, "--time-scale", str(time_scale),
                                 "--admin-port", "-1", "--seed", "1", "--exit-with-parent"])
        for port in bports:
            ds.wait_port(port, timeout=30, proc=sim)

        step(f"starting Envoy (envoy/envoy.yaml) on 127.0.0.1:{listen}, admin :{admin}")
        envoy_yaml = ds.render_envoy(tmp / "envoy.yaml", st.envoy_ports, bports)
        envoy = launch(st, "envoy", [ds.envoy_binary(), "-c", str(envoy_yaml), "--log-level", "warn",
                                     "--use-dynamic-base-id", "--concurrency", "2"])
        wait_until(lambda: "LIVE" in ds.http_get(f"http://127.0.0.1:{admin}/ready", timeout=0.5)[1], 20,
                   "Envoy not ready", envoy)
        ds.wait_port(listen, proc=envoy)
        ds.wait_cluster_healthy(admin, "llm_backends", backends, timeout=15)

        step(f"starting ai-lb (policy {policy}) on 127.0.0.1:{grpc}, metrics :{metrics}")
        st.write_config(policy)
        st.ai_lb = launch(st, "ai-lb", [ds.PY, "-m", "extproc", "serve", "-c", str(st.config_path)])
        ds.wait_port(grpc, proc=st.ai_lb)
        wait_until(lambda: all(ds.envoy_host_health(admin, "ai_lb").values() or [False]), 15,
                   "Envoy never saw ai-lb healthy", st.ai_lb)
        wait_until(lambda: metric(st, "ai_lb_route_endpoints", route="llm", state="healthy") >= backends, 15,
                   "ai-lb never discovered the backends from Envoy's admin API", st.ai_lb)
    except BaseException:
        st.stop()
        raise
    return st


def launch(st: Stack, name: str, argv: list[str]) -> ds.Proc:
    """Spawn with output to ``<tmp>/<name>.log`` and record it for ``Stack.stop``."""
    p = ds.spawn(name, argv, st.tmp)
    st.procs.append(p)
    return p


def wait_until(cond: Any, timeout: float, what: str, proc: ds.Proc | None = None) -> None:
    """Poll ``cond`` (exceptions count as not yet) so start-up waits only as long as needed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.p.returncode}:\n{proc.log_tail()}")
        try:
            if cond():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.1)
    raise TimeoutError(what + (f":\n{proc.log_tail()}" if proc is not None else ""))


def metric(st: Stack, name: str, **labels: str) -> float:
    """Sum of ai-lb's samples ``name`` matching ``labels`` (0 when ai-lb is unreachable)."""
    return sum(v for lab, v in samples(st, name) if all(lab.get(k) == x for k, x in labels.items()))


def samples(st: Stack, name: str) -> list[tuple[dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        _, text = ds.http_get(f"http://127.0.0.1:{st.metrics_port}/metrics", timeout=1)
    except OSError:
        return []
    return [(s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name]


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
def step(msg: str) -> None:
    print(f"==> {msg}", flush=True)


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
    step("phase 3: fail-open: killing ai-lb (SIGKILL), then sending requests")
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


def main(requests: int = 24, policy: str = "least_request", backends: int = 3, time_scale: float = 0.05) -> int:
    """Run the demo; 0 when every request succeeded and ai-lb made decisions."""
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
    try:
        st = start_stack(tmp, policy, backends, time_scale)
        results = phase_compare(st, requests, policy, names)
        switched, rotating = phase_switch(st, names)
        picked = int(metric(st, "ai_lb_decisions_total", outcome="picked"))  # before ai-lb is killed
        results += switched + phase_fail_open(st, names)
        rc = verdict(results, picked, rotating, time.monotonic() - t0)
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


def verdict(results: list[Result], picked: int, rotating: bool, elapsed: float) -> int:
    """0 when every request succeeded, ai-lb really routed (not only fell back) and reloaded."""
    failed = [r for r in results if not r.ok]
    step(f"done in {elapsed:.1f}s: {len(results) - len(failed)}/{len(results)} requests succeeded; "
         f"ai-lb picked the endpoint for {picked} (the others: /native/ and ai-lb down)")
    if failed:
        print(f"FAILED: {len(failed)} request(s) failed, e.g. {failed[0].error or failed[0].status}")
        return 1
    if picked == 0:
        print("FAILED: ai-lb made no routing decisions (every request fell back to native LB)")
        return 1
    if not rotating:
        print("FAILED: after the switch to round_robin, requests did not rotate over the backends")
        return 1
    return 0
