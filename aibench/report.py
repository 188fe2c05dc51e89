"""Results files: ``results.json`` (everything), ``results.md`` (the table), PNG plots."""

from __future__ import annotations

import json
from pathlib import Path


def _load(r: dict) -> str:
    """The offered load: a fraction of measured capacity, or a fixed rate (--rate)."""
    return f"{r['load']:.2f}" if r.get("load") is not None else f"{r.get('offered_rps', 0):.1f} req/s"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def markdown(run: dict) -> str:
    meta = run["meta"]
    lines = [f"# {meta['workload']} (seed {meta['seed']}, {meta['backends']} backends, "
             f"duration {meta['duration_s']:.0f} s)", ""]
    if meta.get("capacity_rps"):
        lines.append(f"Measured capacity: {meta['capacity_rps']:.1f} req/s. ")
    lines += ["", "| system | offered load | status | ok / sent (planned) | TTFT p50 / p90 (ms) | ITL p50 (ms) | E2E p50 / p90 (ms) | "
              "req/s | out tok/s | prefix hit rate | CPU (cores) | machine |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in run["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['system']} | {_load(r)} | **{r['status']}**: {r.get('error', '')[:80]} "
                         "| | | | | | | | | |")
            continue
        s = r["summary"]
        cpu = ", ".join(f"{k} {v['cores']:.2f}" for k, v in r["cpu"]["components"].items())
        hit = r.get("prefix_hit_rate")
        sat = "**saturated**" if r["cpu"].get("saturated") else f"{(r['cpu'].get('machine_busy_mean') or 0) * 100:.0f}% busy"
        lines.append(f"| {r['system']} | {_load(r)} | ok | {s['ok']} / {s['requests']} ({r.get('planned_requests', '-')}) | "
                     f"{_ms(s['ttft_p50_s'])} / {_ms(s['ttft_p90_s'])} | {_ms(s['itl_p50_s'])} | "
                     f"{_ms(s['e2e_p50_s'])} / {_ms(s['e2e_p90_s'])} | {s['throughput_rps']:.2f} | "
                     f"{s['output_tokens_per_s']:.0f} | {'-' if hit is None else f'{hit:.1%}'} | {cpu} | {sat} |")
    warn = [r["system"] for r in run["results"] if r["status"] == "ok" and r["cpu"].get("saturated")]
    if warn:
        lines += ["", f"**Warning:** the machine was saturated during: {', '.join(warn)}. Those numbers measure "
                  "the machine, not the load balancer."]
    return "\n".join(lines) + "\n"


def write(run: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "results.json", out / "results.md"]
    files[0].write_text(json.dumps(run, indent=2, default=str))
    files[1].write_text(markdown(run))
    files += plots(run, out)
    return files


def plots(run: dict, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []  # plots are optional: pip install matplotlib
    files = []
    ok = [r for r in run["results"] if r["status"] == "ok"]
    if not ok:
        return files
    # TTFT CDF at the highest load each system ran.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = {}
    for r in ok:
        if r["system"] not in top or r["offered_rps"] > top[r["system"]]["offered_rps"]:
            top[r["system"]] = r
    for name, r in top.items():
        xs = sorted(x["ttft_s"] for x in r["requests"] if x["ttft_s"] is not None)
        if xs:
            ax.plot([x * 1000 for x in xs], [(i + 1) / len(xs) for i in range(len(xs))], label=f"{name} ({_load(r)})")
    ax.set_xlabel("time to first token (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_xscale("log")
    ax.set_title(f"TTFT CDF: {run['meta']['workload']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    p = out / "ttft_cdf.png"
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)
    # Throughput against offered load.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_sys: dict[str, list] = {}
    for r in ok:
        by_sys.setdefault(r["system"], []).append((r["offered_rps"], r["summary"]["throughput_rps"]))
    for name, pts in by_sys.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("completed requests/s")
    ax.set_title(f"Throughput: {run['meta']['workload']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    p = out / "throughput.png"
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)
    return files
