"""Statistics over a run's results: percentiles, throughput, goodput, failures by status."""

from __future__ import annotations

from typing import Any, Iterable

DEFAULT_SLO_TTFT_S = 1.0


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list, else None."""
    if not xs:
        return None
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def outcome(r: Any) -> str:
    """How a request ended, for the by-status count: "200", "429", "503", "timeout", ..."""
    if r.ok:
        return "200"
    if r.status is not None and r.status != 200:
        return str(r.status)
    return r.error or "unknown"


def summarize(results: Iterable[Any], wall_s: float, slo_ttft_s: float | None = DEFAULT_SLO_TTFT_S) -> dict:
    """Counts, latency percentiles, throughput and goodput (ok requests whose TTFT is within
    ``slo_ttft_s``, per second of the run) of a list of ``loadgen.Result``."""
    results = list(results)
    ok = [r for r in results if r.ok]
    out: dict = {"requests": len(results), "ok": len(ok), "failed": len(results) - len(ok),
                 "errors": {}, "by_status": {}, "wall_s": wall_s,
                 "empty_completions": sum(1 for r in ok if r.empty),
                 "throughput_rps": len(ok) / wall_s if wall_s > 0 else 0.0,
                 "output_tokens_per_s": sum(r.output_tokens for r in ok) / wall_s if wall_s > 0 else 0.0}
    for r in results:
        k = outcome(r)
        out["by_status"][k] = out["by_status"].get(k, 0) + 1
        if not r.ok:
            e = r.error or f"HTTP {r.status}"
            out["errors"][e] = out["errors"].get(e, 0) + 1
    out["shed"] = out["by_status"].get("429", 0)
    for name, vals in (("ttft", [r.ttft_s for r in ok if r.ttft_s is not None]),
                       ("itl", [r.itl_s for r in ok if r.itl_s is not None]),
                       ("e2e", [r.e2e_s for r in ok if r.e2e_s is not None])):
        for q in (50, 90, 99):
            out[f"{name}_p{q}_s"] = percentile(vals, q)
        out[f"{name}_mean_s"] = sum(vals) / len(vals) if vals else None
    if slo_ttft_s is not None:
        good = sum(1 for r in ok if r.ttft_s is not None and r.ttft_s <= slo_ttft_s)
        out.update(slo_ttft_s=slo_ttft_s, good=good, goodput_rps=good / wall_s if wall_s > 0 else 0.0,
                   good_fraction=good / len(results) if results else None)
    served: dict[str, int] = {}
    for r in ok:
        served[r.served_by] = served.get(r.served_by, 0) + 1
    out["served_by"] = served
    return out
