"""Results files: ``results.json`` (everything), ``results.md`` (the tables), PNG plots.

The Markdown has the main table (one row per system and load), a comparison against the
first system at each load (ratios: below 1 is better for latencies, above 1 for hit rate
and goodput), and notes: what a system could not do, caches not reset, where requests went.
"""

from __future__ import annotations

import json
from pathlib import Path

HEADER = ("| system | load | status | ok / sent (planned) | failed, by status | TTFT p50 / p90 (ms) | ITL p50 / p90 (ms) | "
          "E2E p50 / p90 (ms) | req/s | goodput (req/s) | out tok/s | prefix hit rate | CPU (cores) | machine |")


def _load(r: dict) -> str:
    """The offered load: a fraction of measured capacity, or a fixed rate (--rate)."""
    return f"{r['load']:.2f}" if r.get("load") is not None else f"{r.get('offered_rps', 0):.1f} req/s"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def hit_rate(r: dict) -> str:
    h = r.get("prefix_hit_rate")
    if h is None:
        return "-"
    carried = (r.get("cache") or {}).get("state") == "carried over"
    return f"{h:.1%}" + (" (carried over)" if carried else "")


def failures(s: dict) -> str:
    bad = {k: v for k, v in (s.get("by_status") or {}).items() if k != "200"}
    return ", ".join(f"{k} x{v}" for k, v in sorted(bad.items(), key=lambda kv: -kv[1])) or "0"


def row(r: dict) -> str:
    if r["status"] == "failed":
        return f"| {r['system']} | {_load(r)} | **failed**: {r.get('error', '')[:80]} |" + " |" * 11
    s = r["summary"]
    cpu = ", ".join(f"{k} {v['cores']:.2f}" for k, v in r["cpu"]["components"].items())
    sat = "**saturated**" if r["cpu"].get("saturated") else f"{(r['cpu'].get('machine_busy_mean') or 0) * 100:.0f}% busy"
    status = "ok" if r["status"] == "ok" else f"**{r['status']}**"
    good = "-" if s.get("goodput_rps") is None else f"{s['goodput_rps']:.2f}"
    return (f"| {r['system']} | {_load(r)} | {status} | {s['ok']} / {s['requests']} ({r.get('planned_requests', '-')}) | "
            f"{failures(s)} | {_ms(s['ttft_p50_s'])} / {_ms(s['ttft_p90_s'])} | {_ms(s['itl_p50_s'])} / {_ms(s.get('itl_p90_s'))} | "
            f"{_ms(s['e2e_p50_s'])} / {_ms(s['e2e_p90_s'])} | {s['throughput_rps']:.2f} | {good} | "
            f"{s['output_tokens_per_s']:.0f} | {hit_rate(r)} | {cpu} | {sat} |")


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


COMPARED = (("TTFT p50", "ttft_p50_s"), ("TTFT p90", "ttft_p90_s"), ("ITL p90", "itl_p90_s"), ("E2E p90", "e2e_p90_s"),
            ("hit rate", "prefix_hit_rate"), ("goodput", "goodput_rps"))


def value(r: dict, key: str) -> float | None:
    if r.get("status") == "failed":
        return None
    return r.get(key) if key == "prefix_hit_rate" else (r.get("summary") or {}).get(key)


def comparison(results: list[dict]) -> list[str]:
    """Each system against the first system that ran ok at the same load."""
    by_load: dict[str, list[dict]] = {}
    for r in results:
        by_load.setdefault(_load(r), []).append(r)
    lines: list[str] = []
    for load, rs in by_load.items():
        base = next((r for r in rs if r["status"] != "failed"), None)
        if base is None or len(rs) < 2:
            continue
        if not lines:
            lines += ["| system | load | " + " | ".join(n for n, _ in COMPARED) + " |",
                      "|---|---|" + "---|" * len(COMPARED)]
        for r in rs:
            if r is base or r["status"] == "failed":
                continue
            lines.append(f"| {r['system']} | {load} | "
                         + " | ".join(ratio(value(r, k), value(base, k)) for _, k in COMPARED) + " |")
    if not lines:
        return []
    first = next(r["system"] for r in results if r["status"] != "failed")
    return ["", f"Against {first} (the first system) at each load; latencies below 1.00x and hit rate "
            "and goodput above 1.00x are better:", "", *lines]


def header(meta: dict) -> list[str]:
    dur = meta.get("duration_s")
    lines = [f"# {meta['workload']} (seed {meta['seed']}, {meta['backends']} backends"
             + (f", duration {dur:.0f} s" if dur else "") + ")", ""]
    facts = []
    if meta.get("backend_kind"):
        facts.append(f"Backends: {meta['backend_kind']}" + (f", model `{meta['model']}`" if meta.get("model") else "") + ".")
    if meta.get("capacity_rps"):
        facts.append(f"Measured capacity: {meta['capacity_rps']:.1f} req/s.")
    if meta.get("cache_policy"):
        facts.append(meta["cache_policy"])
    if meta.get("slo_ttft_s") is not None:
        facts.append(f"Goodput: ok requests with TTFT <= {meta['slo_ttft_s'] * 1000:.0f} ms, per second.")
    if meta.get("max_prompt_tokens"):
        facts.append(f"Prompts capped at ~{meta['max_prompt_tokens']} tokens.")
    info = meta.get("workload_info") or {}
    if info:
        facts.append("Workload: " + ", ".join(f"{k} {v}" for k, v in info.items() if v is not None and k != "file") + ".")
    return lines + [" ".join(facts), ""] if facts else lines


def notes(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        for n in r.get("notes") or []:
            out.append(f"* {r['system']} ({_load(r)}): {n}")
        if r["status"] != "failed" and r.get("served_by_source"):
            served = r.get("served") or {}
            spread = ", ".join(f"{k} {v:.0f}" for k, v in sorted(served.items())) or "-"
            out.append(f"* {r['system']} ({_load(r)}): served by ({r['served_by_source']}): {spread}")
    return ["", "Notes:", "", *out] if out else []


def markdown(run: dict) -> str:
    res = run["results"]
    lines = header(run["meta"]) + [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    lines += [row(r) for r in res]
    warn = [r["system"] for r in res if r["status"] != "failed" and r["cpu"].get("saturated")]
    if warn:
        lines += ["", f"**Warning:** the machine was saturated during: {', '.join(warn)}. Those numbers measure "
                  "the machine, not the load balancer."]
    lines += comparison(res) + notes(res)
    return "\n".join(lines) + "\n"


def write(run: dict, out: Path) -> list[Path]:
    from .plots import plots

    out.mkdir(parents=True, exist_ok=True)
    files = [out / "results.json", out / "results.md"]
    files[0].write_text(json.dumps(run, indent=2, default=str))
    files[1].write_text(markdown(run))
    files += plots(run, out)
    return files
