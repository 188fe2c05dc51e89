"""PNG plots of a run: the TTFT CDF at each system's highest load, and throughput against
offered load (only when the run had several loads: one point per system says nothing)."""

from __future__ import annotations

from pathlib import Path


def _label(r: dict) -> str:
    return f"{r['load']:.2f}" if r.get("load") is not None else f"{r.get('offered_rps', 0):.1f} req/s"


def plots(run: dict, out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []  # plots are optional: pip install matplotlib
    files: list[Path] = []
    ok = [r for r in run["results"] if r["status"] != "failed"]
    if not ok:
        return files
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top: dict[str, dict] = {}
    for r in ok:
        if r["system"] not in top or r["offered_rps"] > top[r["system"]]["offered_rps"]:
            top[r["system"]] = r
    for name, r in top.items():
        xs = sorted(x["ttft_s"] for x in r["requests"] if x["ttft_s"] is not None)
        if xs:
            ax.plot([x * 1000 for x in xs], [(i + 1) / len(xs) for i in range(len(xs))], label=f"{name} ({_label(r)})")
    ax.set_xlabel("time to first token (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_xscale("log")
    ax.set_title(f"TTFT CDF: {run['meta']['workload']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    p = out / "ttft_cdf.png"
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)
    if len({round(r["offered_rps"], 6) for r in ok}) < 2:
        return files
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
    ax.legend(fontsize=7)
    p = out / "throughput.png"
    fig.tight_layout()
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)
    return files
