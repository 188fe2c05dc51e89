"""ai-lb bench: put each load balancer in turn in front of the same backends, drive the
same seeded traffic through each, and write JSON, Markdown and PNG results.

Backends are simulated vLLM servers started here (fresh for every system), or your own
servers (--backend-urls), whose prefix caches are reset before every system. Traffic is a
synthetic workload, a Mooncake-format trace (trace:FILE) or a log of your own requests
(requests:FILE).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from . import backends as bk
from . import replay, runner, workloads
from .systems import catalog


def _param(s: str) -> tuple[str, str]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    return k.strip(), v.strip()


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown (except where there is none to show), epilog kept as written, and
    long values such as the system list wrapped at commas, not inside names."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=100, max_help_position=30)

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, [], "", argparse.SUPPRESS) or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def parser() -> argparse.ArgumentParser:
    epilog = ("systems (--systems, comma-separated; the default runs all of them):\n" + catalog.describe()
              + "\n\nworkloads (--workload):\n" + workloads.describe()
              + "\n\nother commands:\n  ai-lb bench compare A B   diff two result folders (B against A)\n")
    ap = argparse.ArgumentParser(prog="ai-lb bench", description=__doc__.strip(), epilog=epilog,
                                 formatter_class=_Help)
    t = ap.add_argument_group("traffic")
    t.add_argument("--workload", default="shared-prefix", help="a workload name, trace:FILE or requests:FILE")
    t.add_argument("--workload-param", type=_param, action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of a synthetic workload (e.g. groups=200, zipf_s=1.1); see docs/benchmarks.md")
    t.add_argument("--loads", default=None,
                   help="offered load(s) as fractions of measured capacity (default: the workload's, "
                   "0.9 for shared-prefix and no-sharing-heavy, 1.3 for bursty-heavy, else 0.5)")
    t.add_argument("--rate", type=float, default=None,
                   help="conversations/s instead of --loads (skips calibration); a replayed request without a "
                   "session is a conversation of one")
    t.add_argument("--duration", type=float, default=None,
                   help="seconds during which conversations start (default 30; replays: the whole recording, "
                   "after the time options)")
    t.add_argument("--grace", type=float, default=30.0, help="seconds to let running conversations finish")
    t.add_argument("--seed", type=int, default=1, help="seed of the workload (same seed: same traffic)")
    t.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="cut every prompt to about this many tokens, keeping its beginning (small-context models)")
    t.add_argument("--session-header", default="x-session-id",
                   help="request header carrying a replayed request's session id ('' to send none)")
    r = ap.add_argument_group("replays (trace:FILE, requests:FILE)")
    r.add_argument("--replay-window", default=None, metavar="START:END",
                   help="replay only this part of the recording (seconds after its first request)")
    r.add_argument("--replay-sample", type=float, default=1.0,
                   help="keep this fraction of the requests (request logs: of the sessions), seeded")
    r.add_argument("--replay-speed", type=float, default=None,
                   help="replay this many times faster than recorded (default: the speed that makes --loads/--rate)")
    r.add_argument("--trace-token-scale", type=float, default=1.0,
                   help="scale a trace's token counts (0.25: 128-token blocks); the simulator's KV blocks scale alike")
    s = ap.add_argument_group("systems")
    s.add_argument("--systems", default=",".join(catalog.default_systems()), help="comma-separated system specs (default: all of those listed below: "
                   + ", ".join(catalog.default_systems()) + ")")
    s.add_argument("--ai-lb-config", default=None, metavar="FILE",
                   help="YAML/JSON mapping policy -> lb_config for the ai-lb:POLICY systems")
    s.add_argument("--store", default="memory", help="ai-lb state store (memory or redis://...)")
    b = ap.add_argument_group("backends")
    b.add_argument("--backends", type=int, default=4, help="simulated vLLM servers to start")
    b.add_argument("--backend-urls", default="", help="use these ip:port servers (vLLM or SGLang) instead")
    b.add_argument("--model", default=None,
                   help="model to request (default: sim-model for the simulator, else the first of /v1/models)")
    b.add_argument("--sim-args", default="--stream-chunk-tokens 4",
                   help="extra simulator flags (e.g. '--time-scale 0.5 --num-gpu-blocks 4096')")
    b.add_argument("--calibrate", type=float, default=6.0, help="seconds of saturating load to measure capacity")
    b.add_argument("--reset-timeout", type=float, default=30.0,
                   help="seconds to wait for your backends to be idle and their caches reset before each system")
    o = ap.add_argument_group("results")
    o.add_argument("--out", type=Path, default=None, help="results folder (default: ./bench-results/<workload>-<time>)")
    o.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="TTFT bound for goodput (0: no goodput)")
    return ap


def plan_from(a: argparse.Namespace, out: Path) -> runner.Plan:
    if not replay.is_replay(a.workload) and a.workload not in workloads.WORKLOADS:
        raise ValueError(f"unknown workload {a.workload!r}; choose from "
                         f"{', '.join(workloads.WORKLOADS)}, trace:FILE, requests:FILE")
    if replay.is_replay(a.workload) and not Path(a.workload.split(":", 1)[1]).is_file():
        raise ValueError(f"{a.workload}: no such file")
    opts = replay.ReplayOptions(window=replay.parse_window(a.replay_window), sample=a.replay_sample,
                                speed=a.replay_speed, token_scale=a.trace_token_scale)
    return runner.Plan(workload=a.workload, seed=a.seed, duration=a.duration, params=dict(a.workload_param),
                       replay=opts, max_prompt_tokens=a.max_prompt_tokens,
                       slo_ttft_s=a.slo_ttft_ms / 1000.0 if a.slo_ttft_ms > 0 else None, grace=a.grace,
                       session_header=a.session_header or None, store=a.store,
                       ai_lb_overrides=catalog.load_ai_lb_config(a.ai_lb_config), out=out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        from . import compare

        return compare.main(argv[1:])
    a = parser().parse_args(argv)
    out = a.out or Path("bench-results") / f"{runner.slug(a.workload)}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        plan = plan_from(a, out)
        specs = catalog.split_specs(a.systems)
        user = [u.strip() for u in a.backend_urls.split(",") if u.strip()]
        sim_args = runner.sim_args_for(plan, a.sim_args.split()) if not user else []
    except (ValueError, OSError) as e:
        print(f"ai-lb bench: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ai-lb-bench-"))
    fleet = bk.UserFleet(user, a.model, a.reset_timeout) if user else \
        bk.SimFleet(a.backends, work, sim_args, model=a.model or "sim-model")
    meta = {"workload": a.workload, "seed": a.seed, "duration_s": a.duration, "systems": specs,
            "backends": len(fleet.addresses), "sim_args": " ".join(sim_args) if not user else None,
            "store": a.store, "slo_ttft_s": plan.slo_ttft_s, "max_prompt_tokens": a.max_prompt_tokens,
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        backends = fleet.start()
        info = bk.probe(backends.addresses)
        if user:
            if not a.model and not info.model:
                raise RuntimeError(f"no model named by --model and none found at http://{user[0]}/v1/models")
            fleet.model = backends.model = a.model or info.model or ""
            local = "local processes, CPU measured" if fleet.local else "not all local: their CPU is not measured"
            meta["backend_kind"] = f"your servers {', '.join(user)} ({info.flavor} metrics; {local})"
        else:
            meta["backend_kind"] = f"{a.backends} simulated vLLM servers (vllmsim {' '.join(sim_args)})"
        meta.update(model=backends.model, kv_tokens_per_server=info.kv_tokens, max_model_len=info.max_model_len)
        plan.model = backends.model
        plan.env = {"backends": len(backends.addresses), "kv_tokens": info.kv_tokens or workloads.DEFAULT_KV_TOKENS}
        loads = [float(x) for x in a.loads.split(",")] if a.loads else \
            [workloads.WORKLOADS[a.workload].default_load] if a.workload in workloads.WORKLOADS else [0.5]
        lv = runner.levels(plan, fleet, backends, loads, a.rate, a.calibrate, meta)
        meta["workload_info"] = plan.build(lv[0][1]).info
    except Exception as e:  # noqa: BLE001
        print(f"ai-lb bench: cannot prepare the backends: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        if isinstance(fleet, bk.SimFleet):
            fleet.stop()
    results = []
    for load, rate_conv in lv:
        for spec in specs:
            print(f"running {spec} at {runner._level(load, rate_conv)}", file=sys.stderr)
            results.append(runner.run_one(spec, load, rate_conv, plan, fleet))
    meta["cache_policy"] = cache_policy(results, bool(user))
    run = {"meta": meta, "results": results}
    from . import report

    files = report.write(run, out)
    print(report.markdown(run))
    print(f"results in {out}/: " + ", ".join(f.name for f in files))
    failed = [r["system"] for r in results if r["status"] != "ok"]
    if failed:
        print(f"systems not ok: {', '.join(failed)}", file=sys.stderr)
    return 0


def cache_policy(results: list[dict], user: bool) -> str:
    if not user:
        return "Every system started on freshly started simulators (empty caches, zeroed counters)."
    states = [r.get("cache") or {} for r in results]
    if all(s.get("state") == "reset" for s in states):
        methods = sorted({m for s in states for m in s.get("methods", [])})
        return ("Before every system the backends were drained and their prefix caches reset "
                f"({', '.join(methods)}).")
    return ("Prefix caches could NOT be reset before every system (see notes): a hit rate marked "
            "\"carried over\" includes what earlier systems (or the calibration) left in the caches.")


if __name__ == "__main__":
    sys.exit(main())
