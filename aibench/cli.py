"""``ai-lb bench``: start backends, put each system in front of them in turn, drive the same
seeded workload through each, and write JSON, Markdown and PNG results.

    ai-lb bench --workload shared-prefix --backends 8 --duration 30 --loads 0.5 \\
        --systems envoy-rr,envoy-lr,ai-lb:prefix_cache,sglang-router,oracle

Every system gets freshly started backends (empty KV caches, zeroed counters), so no
system inherits another's warm cache.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

from . import loadgen, monitor, report, workloads
from .systems.api import Backends

DEFAULT_SYSTEMS = ("envoy-rr,envoy-lr,ai-lb:round_robin,ai-lb:global_least_request,ai-lb:prefix_cache,"
                   "ai-lb:endpoint_metrics,sglang-router,vllm-router,oracle")
AI_LB_CONFIG = {"endpoint_metrics": {"metric_policy": "default"}}
# Simulator flags a workload needs whatever the user passes: instant backends for the
# gateway-overhead workload, a long context window (Llama-3.1's 128k) for 200 KB prompts.
WORKLOAD_SIM_ARGS = {"overhead": ["--time-scale", "0.001"], "long-prompt": ["--max-model-len", "131072"]}
# Policies that read the engines' KV-cache events: their backends publish them (vLLM's
# --kv-events-config, connecting out to ai-lb, with a replay endpoint) and the route is
# told where each backend's events arrive and which tokenizer the model uses.
KV_EVENTS_POLICIES = ("precise_prefix_cache",)


def make_system(spec: str, store: str, lb_extra: dict | None = None):
    from . import systems

    if spec == "envoy-rr":
        return systems.EnvoyNative("round_robin")
    if spec == "envoy-lr":
        return systems.EnvoyNative("least_request")
    if spec.startswith("ai-lb:"):
        pol = spec.split(":", 1)[1]
        return systems.EnvoyAiLb(pol, {**AI_LB_CONFIG.get(pol, {}), **(lb_extra or {})}, store=store)
    if spec == "sglang-router":
        return systems.SglangRouter()
    if spec == "vllm-router":
        return systems.VllmRouter()
    if spec == "oracle":
        return systems.Oracle()
    raise ValueError(f"unknown system {spec!r}; e.g. {DEFAULT_SYSTEMS}")


class SimBackends:
    """N simulated vLLM servers in one process, restarted fresh for every system."""

    def __init__(self, n: int, workdir: Path, args: list[str]) -> None:
        from .devstack import free_ports

        self.ports = free_ports(n)
        self.workdir = workdir
        self.args = args
        self.proc = None
        self.kv_base = self.replay_base = 0

    def start(self, kv_events: bool = False) -> Backends:
        from .devstack import free_port_range, start_sim

        extra: list[str] = []
        if kv_events:   # server i connects out to kv_base + i and binds its replay ROUTER on replay_base + i
            n = len(self.ports)
            self.kv_base = free_port_range(n, avoid=self.ports)
            self.replay_base = free_port_range(n, avoid=[*self.ports, *range(self.kv_base, self.kv_base + n)])
            extra = ["--kv-events-config", json.dumps({
                "enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://127.0.0.1:{self.kv_base}",
                "replay_endpoint": f"tcp://127.0.0.1:{self.replay_base}", "topic": "kv@{host}:{port}"})]
        self.proc = start_sim(self.workdir, self.ports, "--model", "sim-model", "--admin-port", "-1", *self.args,
                              *extra, name="sim")
        return Backends([f"127.0.0.1:{p}" for p in self.ports], "sim-model", pids={"sim": self.proc.p.pid})

    def kv_lb_config(self) -> dict:
        """The precise route's lb_config for these backends: ai-lb binds each one's port."""
        import vllmsim

        addrs = [f"127.0.0.1:{p}" for p in self.ports]
        return {"tokenizer": str(vllmsim.MODEL_DIR), "kv_events": {
            "endpoint": "tcp://127.0.0.1:{port}", "bind": True,
            "endpoints": {a: f"tcp://127.0.0.1:{self.kv_base + i}" for i, a in enumerate(addrs)},
            "replay_endpoints": {a: f"tcp://127.0.0.1:{self.replay_base + i}" for i, a in enumerate(addrs)}}}

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()
            self.proc = None


async def prefix_counters(addresses: list[str]) -> tuple[float, float]:
    """Sum of vllm:prefix_cache_hits_total and _queries_total over the backends."""
    import aiohttp

    hits = queries = 0.0
    async with aiohttp.ClientSession() as s:
        for a in addresses:
            try:
                async with s.get(f"http://{a}/metrics", timeout=aiohttp.ClientTimeout(total=3)) as r:
                    txt = await r.text()
            except Exception:  # noqa: BLE001
                continue
            for line in txt.splitlines():
                if line.startswith("vllm:prefix_cache_hits_total"):
                    hits += float(line.rsplit(" ", 1)[1])
                elif line.startswith("vllm:prefix_cache_queries_total"):
                    queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


async def measure_capacity(backends: Backends, w: workloads.Workload, seconds: float) -> float:
    """Completed requests/s when the backends are saturated (client-side round robin,
    non-streaming, requests drawn from the workload)."""
    import aiohttp

    reqs = [(c.messages(0), c.turns[0].max_tokens) for c in w.conversations] or [([{"role": "user", "content": "x"}], 16)]
    conc = 16 * len(backends.addresses)
    done = 0
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async def worker(i: int) -> None:
            nonlocal done
            k = i
            while time.monotonic() < deadline:
                msgs, mt = reqs[k % len(reqs)]
                addr = backends.addresses[k % len(backends.addresses)]
                k += conc
                try:
                    async with s.post(f"http://{addr}/v1/chat/completions", json={
                            "model": backends.model, "messages": msgs, "max_tokens": mt},
                            timeout=aiohttp.ClientTimeout(total=max(1.0, deadline - time.monotonic() + 5))) as r:
                        await r.read()
                        if r.status == 200 and time.monotonic() <= deadline:
                            done += 1
                except Exception:  # noqa: BLE001
                    pass
        t0 = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(conc)))
    return done / max(time.monotonic() - t0, 1e-9)


def run_one(spec: str, load: float | None, rate_conv: float, args, sim: SimBackends | None, user_backends: Backends | None,
            out: Path, store: str) -> dict:
    w = workloads.make(args.workload, args.seed, args.duration, rate_conv)
    entry = {"system": spec, "load": load, "offered_rps": rate_conv * (w.requests / max(len(w.conversations), 1)),
             "planned_requests": w.requests, "status": "ok"}
    events = spec.startswith("ai-lb:") and spec.split(":", 1)[1] in KV_EVENTS_POLICIES
    backends = user_backends or sim.start(kv_events=events)
    system = None
    try:
        system = make_system(spec, store, sim.kv_lb_config() if events and sim is not None and user_backends is None
                             else None)
        url = system.start(backends, out / "logs" / spec.replace(":", "-") / f"load{load if load is not None else rate_conv}")
        h0, q0 = asyncio.run(prefix_counters(backends.addresses))
        prog = loadgen.Progress(w.requests)
        t_start = time.monotonic()

        def tick() -> None:
            el = time.monotonic() - t_start
            msg = f"  {spec:<28} {_level(load, rate_conv)}: {prog.done}/{prog.total} requests, {prog.failed} failed, {el:5.1f}s"
            if sys.stderr.isatty():
                print("\r" + msg, end="", file=sys.stderr, flush=True)
            elif int(el) % 10 == 0 and el - int(el) < 0.5:
                print(msg, file=sys.stderr, flush=True)

        with monitor.CpuMonitor({**backends.pids, **system.pids()}) as mon:
            results, wall = asyncio.run(loadgen.run(url, w, backends.model, grace_s=args.grace, progress=prog, on_tick=tick))
        if sys.stderr.isatty():
            print(file=sys.stderr)
        h1, q1 = asyncio.run(prefix_counters(backends.addresses))
        entry.update(summary=loadgen.summarize(results, wall), cpu=mon.report(),
                     prefix_hit_rate=(h1 - h0) / (q1 - q0) if q1 > q0 else None,
                     requests=[r.to_dict() for r in results])
    except Exception as e:  # noqa: BLE001 - a system that fails is reported, the run goes on
        entry.update(status="failed", error=f"{type(e).__name__}: {e}"[:2000])
        print(f"  {spec}: FAILED: {entry['error'][:300]}", file=sys.stderr)
    finally:
        if system is not None:
            try:
                system.stop()
            except Exception:  # noqa: BLE001
                pass
        if sim is not None and user_backends is None:
            sim.stop()
    return entry


def _level(load: float | None, rate_conv: float) -> str:
    return f"load {load:.2f}" if load is not None else f"{rate_conv:g} conv/s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ai-lb bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", default="shared-prefix", choices=sorted(workloads.WORKLOADS))
    ap.add_argument("--systems", default=DEFAULT_SYSTEMS, help="comma-separated (default: all)")
    ap.add_argument("--backends", type=int, default=4, help="simulated vLLM servers to start")
    ap.add_argument("--backend-urls", default="", help="use these ip:port backends instead of the simulator")
    ap.add_argument("--model", default="sim-model")
    ap.add_argument("--sim-args", default="--stream-chunk-tokens 4",
                    help="extra simulator flags (e.g. '--time-scale 0.5 --profile h100-8b')")
    ap.add_argument("--loads", default="0.5", help="offered load(s) as fractions of measured capacity")
    ap.add_argument("--rate", type=float, default=None, help="conversations/s instead of --loads (skips calibration)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds during which conversations start")
    ap.add_argument("--grace", type=float, default=30.0, help="seconds to let running conversations finish")
    ap.add_argument("--calibrate", type=float, default=6.0, help="seconds of saturating load to measure capacity")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--store", default="memory", help="ai-lb state store (memory or redis://...)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench-results/<time>)")
    a = ap.parse_args(argv)

    out = a.out or Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ai-lb-bench-"))
    specs = [s.strip() for s in a.systems.split(",") if s.strip()]
    user = Backends([u.strip() for u in a.backend_urls.split(",") if u.strip()], a.model) if a.backend_urls else None
    sim = None if user else SimBackends(a.backends, work, a.sim_args.split() + WORKLOAD_SIM_ARGS.get(a.workload, []))
    meta = {"workload": a.workload, "seed": a.seed, "duration_s": a.duration, "systems": specs,
            "backends": len(user.addresses) if user else a.backends, "sim_args": a.sim_args, "store": a.store,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    probe = workloads.make(a.workload, a.seed, a.duration, 1.0)
    turns = probe.requests / max(len(probe.conversations), 1)
    if a.rate is not None:
        levels = [(None, a.rate)]
    else:
        b = user or sim.start()
        try:
            print(f"calibrating capacity for {a.workload} ({a.calibrate:.0f} s of saturating load) ...", file=sys.stderr)
            cap = asyncio.run(measure_capacity(b, probe, a.calibrate))
        finally:
            if sim:
                sim.stop()
        meta["capacity_rps"] = cap
        print(f"capacity: {cap:.1f} req/s", file=sys.stderr)
        levels = [(float(x), float(x) * cap / turns) for x in a.loads.split(",")]
    results = []
    for load, rate_conv in levels:
        for spec in specs:
            print(f"running {spec} at {rate_conv:.2f} conversations/s", file=sys.stderr)
            results.append(run_one(spec, load, rate_conv, a, sim, user, out, a.store))
    run = {"meta": meta, "results": results}
    files = report.write(run, out)
    print(report.markdown(run))
    print("results: " + ", ".join(str(f) for f in files))
    failed = [r["system"] for r in results if r["status"] != "ok"]
    if failed:
        print(f"failed systems: {', '.join(failed)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
