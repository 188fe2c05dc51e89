"""``ai-lb bench compare A B``: what changed from result folder A to result folder B.

Rows are matched by system and load (the offered load's fraction, or its rate). For each
matched row: A's and B's TTFT p50/p90, E2E p90, prefix hit rate and goodput, and B/A. Rows
only one side has are listed, and so are differences in how the two runs were made
(workload, seed, backends, duration), because a diff across different setups compares
setups, not load balancers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .report import COMPARED, _load, ratio, value

SETUP_KEYS = ("workload", "seed", "backends", "duration_s", "backend_kind", "model", "sim_args", "store", "slo_ttft_s")


def load_run(path: Path) -> dict:
    f = path / "results.json" if path.is_dir() else path
    try:
        return json.loads(f.read_text())
    except OSError as e:
        raise SystemExit(f"ai-lb bench compare: cannot read {f}: {e.strerror}") from None
    except ValueError as e:
        raise SystemExit(f"ai-lb bench compare: {f} is not a results.json ({e})") from None


def _fmt(key: str, v: float | None) -> str:
    if v is None:
        return "-"
    if key == "prefix_hit_rate":
        return f"{v:.1%}"
    if key == "goodput_rps":
        return f"{v:.2f}"
    return f"{v * 1000:.0f}"


def diff(a: dict, b: dict, name_a: str = "A", name_b: str = "B") -> str:
    lines = [f"# {name_b} against {name_a}", ""]
    ma, mb = a.get("meta", {}), b.get("meta", {})
    changed = [k for k in SETUP_KEYS if ma.get(k) != mb.get(k)]
    if changed:
        lines += ["Setups differ: " + "; ".join(f"{k}: {ma.get(k)!r} -> {mb.get(k)!r}" for k in changed), ""]
    key = lambda r: (r["system"], _load(r))  # noqa: E731
    ra = {key(r): r for r in a.get("results", [])}
    rb = {key(r): r for r in b.get("results", [])}
    head = " | ".join(f"{n} (ms)" if k.endswith("_s") else n for n, k in COMPARED)
    lines += [f"Each cell: {name_a} -> {name_b} (B/A).", "", f"| system | load | status | {head} |",
              "|---|---|---|" + "---|" * len(COMPARED)]
    for k in [k for k in ra if k in rb]:
        x, y = ra[k], rb[k]
        cells = [f"{_fmt(c, value(x, c))} -> {_fmt(c, value(y, c))} ({ratio(value(y, c), value(x, c))})"
                 for _, c in COMPARED]
        status = x["status"] if x["status"] == y["status"] else f"{x['status']} -> {y['status']}"
        lines.append(f"| {k[0]} | {k[1]} | {status} | " + " | ".join(cells) + " |")
    only_a = [f"{s} ({load})" for s, load in ra if (s, load) not in rb]
    only_b = [f"{s} ({load})" for s, load in rb if (s, load) not in ra]
    if only_a:
        lines += ["", f"Only in {name_a}: " + ", ".join(only_a)]
    if only_b:
        lines += ["", f"Only in {name_b}: " + ", ".join(only_b)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ai-lb bench compare", description="Diff two ai-lb bench result folders "
                                 "(or results.json files): B against A, row by row.")
    ap.add_argument("a", type=Path, help="the baseline results folder")
    ap.add_argument("b", type=Path, help="the results folder to compare with it")
    ap.add_argument("--out", type=Path, default=None, help="also write the diff to this Markdown file")
    args = ap.parse_args(argv)
    text = diff(load_run(args.a), load_run(args.b), str(args.a), str(args.b))
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
