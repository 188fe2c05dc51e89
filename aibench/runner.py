"""One bench run: workloads built per load level, capacity calibration, and each system
in turn in front of backends that start cold (restarted simulators, or reset caches)."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import backends as bk
from . import loadgen, monitor, replay, stats, workloads
from .systems import catalog
from .systems.api import Backends
from .traffic import Workload


@dataclass
class Plan:
    """Everything about a run that does not change between systems."""

    workload: str
    seed: int = 1
    duration: float | None = None          # None: the workload's default (30 s, replays: all of it)
    params: dict[str, str] = field(default_factory=dict)
    replay: replay.ReplayOptions = field(default_factory=replay.ReplayOptions)
    env: dict[str, Any] = field(default_factory=dict)
    model: str = "sim-model"
    max_prompt_tokens: int | None = None
    slo_ttft_s: float | None = stats.DEFAULT_SLO_TTFT_S
    grace: float = 30.0
    session_header: str | None = "x-session-id"
    store: str = "memory"
    ai_lb_overrides: dict[str, dict] = field(default_factory=dict)
    out: Path = Path("bench-results")

    def build(self, rate: float) -> Workload:
        """The workload at ``rate`` conversations per second (same seed: same traffic)."""
        if replay.is_replay(self.workload):
            opts = replay.ReplayOptions(**{**self.replay.__dict__, "duration": self.duration})
            return replay.make(self.workload, self.seed, rate, opts)
        return workloads.make(self.workload, self.seed, self.duration or 30.0, rate, self.env, self.params)


def slug(workload: str) -> str:
    kind, _, file = workload.partition(":")
    name = f"{kind}-{Path(file).stem}" if file else kind
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "bench"


def sim_args_for(plan: Plan, user_args: list[str]) -> list[str]:
    """Simulator flags: the workload's needs first, the user's --sim-args after (so they win)."""
    pre: list[str] = []
    if replay.is_replay(plan.workload):
        w = plan.build(1.0)
        need = int(w.info.get("max_request_tokens") or 0) + 64
        if need > 8192:
            pre += ["--max-model-len", str(need)]
        scale = plan.replay.token_scale
        if scale != 1.0 and "--num-gpu-blocks" not in user_args:
            pre += ["--num-gpu-blocks", str(scaled_gpu_blocks(user_args, scale))]
    else:
        pre += list(workloads.WORKLOADS[plan.workload].sim_args)
    return pre + user_args


def scaled_gpu_blocks(sim_args: list[str], scale: float) -> int:
    """The simulator profile's KV blocks times the trace's token scale."""
    from vllmsim.cli import build_parser
    from vllmsim.profile import load_profile

    ns, _ = build_parser().parse_known_args(["serve", *sim_args])
    return max(64, round(load_profile(ns.profile).num_gpu_blocks * scale))


async def measure_capacity(backends: Backends, w: Workload, seconds: float, max_prompt_tokens: int | None = None) -> float:
    """Completed requests/s when the backends are saturated (client-side round robin,
    non-streaming, requests drawn from the workload), counted over the last two thirds of
    the window: the first third fills the queues (long prompts take seconds to come back)."""
    import aiohttp

    reqs = [c.request(0, max_prompt_tokens) for c in w.conversations[:2000]]
    reqs = reqs or [("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 16})]
    conc = 16 * len(backends.addresses)
    done = 0
    warm = time.monotonic() + seconds / 3
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async def worker(i: int) -> None:
            nonlocal done
            k = i
            while time.monotonic() < deadline:
                path, body = reqs[k % len(reqs)]
                addr = backends.addresses[k % len(backends.addresses)]
                k += conc
                try:
                    async with s.post(f"http://{addr}{path}", json={**body, "model": backends.model},
                                      timeout=aiohttp.ClientTimeout(total=max(1.0, deadline - time.monotonic() + 5))) as r:
                        await r.read()
                        if r.status == 200 and warm <= time.monotonic() <= deadline:
                            done += 1
                except Exception:  # noqa: BLE001
                    pass
        await asyncio.gather(*(worker(i) for i in range(conc)))
    return done / max(deadline - warm, 1e-9)


def _served(results: list[loadgen.Result], system, before) -> tuple[str, dict[str, float]]:
    heads = {r.served_by for r in results if r.ok and r.served_by}
    if heads:
        src = ("response header x-oracle-pick" if system.name == "oracle"
               else "response header x-aibench-upstream (Envoy %UPSTREAM_HOST%)")
        out: dict[str, float] = {}
        for r in results:
            if r.ok:
                out[r.served_by or "unknown"] = out.get(r.served_by or "unknown", 0) + 1
        return src, out
    after = system.served_counts()
    if after and before:
        return after[0], {k: v - before[1].get(k, 0.0) for k, v in after[1].items()}
    return "unknown (the system names no backend, in responses or metrics)", {}


def run_one(spec: str, load: float | None, rate: float, plan: Plan, fleet) -> dict:
    w = plan.build(rate)
    offered = w.requests / max(w.duration_s, 1e-9) if w.replay else rate * w.requests / max(len(w.conversations), 1)
    entry: dict[str, Any] = {"system": spec, "load": load, "offered_rps": offered, "planned_requests": w.requests,
                             "status": "ok", "notes": []}
    system = None
    try:
        events = spec.startswith("ai-lb:") and catalog.parse_ai_lb(spec)[0] in catalog.KV_EVENTS_POLICIES
        roles = catalog.fleet_roles(spec, len(fleet.addresses))
        backends, entry["cache"] = fleet.prepare(kv_events=events, roles=roles)
        if entry["cache"]["state"] != "fresh" and entry["cache"].get("failed"):
            entry["notes"].append("prefix caches not reset on " + ", ".join(
                f"{a} ({why})" for a, why in entry["cache"]["failed"].items()))
        overrides = plan.ai_lb_overrides
        if events and isinstance(fleet, bk.SimFleet):
            pol = catalog.parse_ai_lb(spec)[0]
            overrides = {**overrides, pol: {**fleet.kv_lb_config(), **overrides.get(pol, {})}}
        elif events and "kv_events" not in overrides.get(catalog.parse_ai_lb(spec)[0], {}) and "kv_events" not in spec:
            raise ValueError("a KV-events policy on --backend-urls needs their publishers: give kv_events "
                             "(and tokenizer) for it in --ai-lb-config (docs/policies/precise_prefix.md)")
        system = catalog.make_system(spec, plan.store, overrides)
        logs = plan.out / "logs" / re.sub(r"[^A-Za-z0-9_.=-]+", "-", spec).strip("-")[:80]
        url = system.start(backends, logs / f"load{load if load is not None else rate:g}")
        c0, s0 = bk.counters(backends.addresses), system.served_counts()
        prog = loadgen.Progress(w.requests)
        t_start = time.monotonic()

        def tick() -> None:
            el = time.monotonic() - t_start
            msg = f"  {spec[:40]:<40} {_level(load, rate)}: {prog.done}/{prog.total} requests, {prog.failed} failed, {el:5.1f}s"
            if sys.stderr.isatty():
                print("\r" + msg, end="", file=sys.stderr, flush=True)
            elif int(el) % 10 == 0 and el - int(el) < 0.5:
                print(msg, file=sys.stderr, flush=True)

        with monitor.CpuMonitor({**backends.pids, **system.pids()}) as mon:
            results, wall = asyncio.run(loadgen.run(url, w, backends.model, grace_s=plan.grace, progress=prog,
                                                    on_tick=tick, max_prompt_tokens=plan.max_prompt_tokens,
                                                    session_header=plan.session_header))
        if sys.stderr.isatty():
            print(file=sys.stderr)
        c1 = bk.counters(backends.addresses)
        status, notes = system.verdict()
        src, served = _served(results, system, s0)
        dq = c1["queries"] - c0["queries"]
        entry.update(status=status, summary=stats.summarize(results, wall, plan.slo_ttft_s), cpu=mon.report(),
                     prefix_hit_rate=(c1["hits"] - c0["hits"]) / dq if dq > 0 else None,
                     prefix_cache={"hits": c1["hits"] - c0["hits"], "queries": dq},
                     served_by_source=src, served=served,
                     backend_requests={a: v - c0["requests"].get(a, 0.0) for a, v in c1["requests"].items()},
                     requests=[r.to_dict() for r in results])
        entry["notes"] += notes
    except Exception as e:  # noqa: BLE001 - a system that fails is reported, the run goes on
        entry.update(status="failed", error=f"{type(e).__name__}: {e}"[:2000])
        print(f"  {spec}: FAILED: {entry['error'][:300]}", file=sys.stderr)
    finally:
        if system is not None:
            try:
                system.stop()
            except Exception:  # noqa: BLE001
                pass
        if isinstance(fleet, bk.SimFleet):
            fleet.stop()
    return entry


def _level(load: float | None, rate: float) -> str:
    return f"load {load:.2f}" if load is not None else f"{rate:g} conv/s"


def levels(plan: Plan, fleet, backends: Backends, loads: list[float] | None, rate: float | None,
           calibrate_s: float, meta: dict) -> list[tuple[float | None, float]]:
    """(load, conversations/s) per level: a fixed rate, or fractions of measured capacity."""
    probe = plan.build(1.0)
    turns = probe.requests / max(len(probe.conversations), 1)
    if rate is not None or plan.replay.speed is not None:
        return [(None, rate if rate is not None else 1.0)]
    print(f"calibrating capacity for {plan.workload} ({calibrate_s:.0f} s of saturating load) ...", file=sys.stderr)
    cap = asyncio.run(measure_capacity(backends, probe, calibrate_s, plan.max_prompt_tokens))
    meta["capacity_rps"] = cap
    print(f"capacity: {cap:.1f} req/s", file=sys.stderr)
    if cap <= 0:
        raise RuntimeError(f"no request completed in the last {calibrate_s * 2 / 3:.0f} s of the calibration: "
                           "slow backends need a longer --calibrate, or give --rate")
    return [(x, x * cap / turns) for x in (loads or [0.5])]
