"""Gateway overhead: Envoy's round robin, Envoy + ai-lb and sglang-router side by side, in one run.

Instant backends (an Envoy answering with ``direct_response``) isolate the cost of the
gateway. The same gateway Envoy serves the ai-lb columns and Envoy RR: ``/native/...`` has
ext_proc off (Envoy round robin), ``/...`` goes through ai-lb (round_robin: headers only;
prefix_cache: reads and hashes the body). The ``floor`` column is a second gateway Envoy,
same config, whose ext_proc server is ``aibench.floor`` (C, no work): what the ext_proc
round trip costs by itself, so what no ext_proc server can beat. sglang-router is put in
front of the same backends. Within each round every column runs once, in turn, and cells are medians over
rounds, so machine noise hits every column alike. Load comes from ``wrk`` (closed loop,
connections = concurrency); ai-lb's CPU per request is read from ``/proc`` during its runs.
Every run through ext_proc also reads Envoy's ``ext_proc.streams_failed``: a failed call
falls open (200, native LB) and would look fast, so failures are printed and counted.

    python -m aibench.overhead                 # full run (~6 min)
    python -m aibench.overhead --quick         # 1 round, short runs
    python -m aibench.overhead --workers 2     # ai-lb with server.workers: 2

Prints a table and the issue's targets; copy them into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from . import devstack as ds
from . import floor as ext_proc_floor
from .overhead_wrk import LUA, chat_body, run_wrk, start_instant_backends

# label, body bytes, connections, think time per connection (ms)
CASES = [("1 KB, c=1", 1024, 1, 0.0),
         ("1 KB, c=32, 40 ms think", 1024, 32, 40.0),
         ("220 KB, c=20, 40 ms think", 220 * 1024, 20, 40.0),
         ("1 KB, c=32, flat out", 1024, 32, 0.0)]
COLUMNS = ("envoy-rr", "floor", "ai-lb:round_robin", "ai-lb:prefix_cache", "sglang-router")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--workers", type=int, default=1, help="ai-lb server.workers")
    ap.add_argument("--completions", default="auto", help="ai-lb server.completions (auto, access_log, stream)")
    ap.add_argument("--sglang-policy", default="round_robin", help="sglang-router --policy")
    ap.add_argument("--columns", default=",".join(COLUMNS))
    ap.add_argument("--cases", default="", help="comma-separated case indexes (default: all)")
    ap.add_argument("--json", type=Path, default=None, help="also write results here")
    ap.add_argument("--ai-lb-source", type=Path, default=None,
                    help="run ai-lb from this source tree instead (e.g. an older commit's `git archive`: the 'before')")
    a = ap.parse_args()
    if not shutil.which("wrk"):
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    seconds = a.seconds or (3 if a.quick else 5)
    rounds = a.rounds or (1 if a.quick else 3)
    columns = [c for c in a.columns.split(",") if c]
    cases = [CASES[int(i)] for i in a.cases.split(",")] if a.cases else CASES
    tmp = Path(tempfile.mkdtemp(prefix="ai-lb-bench-"))
    procs: list[ds.Proc] = []
    sglang = None
    try:
        bports = ds.free_ports(4)
        badmin, listen, admin, grpc, metrics = ds.free_ports(5)
        procs.append(start_instant_backends(tmp, badmin, bports))
        ports = ds.EnvoyPorts(listen, admin, grpc)
        procs.append(ds.start_envoy(tmp, ports, bports, message_timeout=2.0))
        ds.wait_cluster_healthy(admin, "llm_backends", len(bports))
        cfg_path = tmp / "ai-lb.yaml"
        server = {"fallback_log_interval": 10.0, "reload_interval": 0.2}
        if a.workers != 1 or a.completions != "auto":   # an older ai-lb knows neither
            server.update(workers=a.workers, completions=a.completions)

        def use(pol: str) -> None:
            ds.write_ai_lb_config(cfg_path, grpc, metrics, {"llm": {"lb_policy": pol, "endpoints": {"cluster": "llm_backends"}}},
                                  envoy_admin_port=admin, log_level="warning", server=server)

        use("round_robin")
        ai = ds.start_ai_lb(tmp, cfg_path, grpc) if a.ai_lb_source is None else _start_from(a.ai_lb_source, tmp, cfg_path, grpc)
        procs.append(ai)
        time.sleep(1.0)
        current = ["round_robin"]
        floor_admin = 0
        if "floor" in columns:
            try:
                floor_base, floor_admin, floor_pid = _start_floor(tmp, bports, procs)
            except ext_proc_floor.FloorUnavailable as e:
                print(f"# no floor column: {e}", flush=True)
                columns.remove("floor")
        if "sglang-router" in columns:
            from .systems.api import Backends
            from .systems.peers import SglangRouter

            sglang = SglangRouter(policy=a.sglang_policy)
            sglang_url = sglang.start(Backends([f"127.0.0.1:{p}" for p in bports]), tmp)
        lua = tmp / "post.lua"
        lua.write_text(LUA)
        base = f"http://127.0.0.1:{listen}"

        def run(col: str, body: Path, conc: int, secs: float, think: float) -> dict:
            if col.startswith("ai-lb:"):
                pol = col.split(":", 1)[1]
                if current[0] != pol:
                    use(pol)
                    current[0] = pol
                    time.sleep(0.8)  # the file watcher applies it (reload_interval 0.2 s)
                return _checked(admin, lambda: run_wrk(base + "/v1/chat/completions", body, lua, conc, secs, think,
                                                       cpu_of={"ai-lb": ai.p.pid}))
            if col == "floor":
                return _checked(floor_admin, lambda: run_wrk(floor_base + "/v1/chat/completions", body, lua, conc, secs,
                                                             think, cpu_of={"floor": floor_pid}))
            url = base + "/native/v1/chat/completions" if col == "envoy-rr" else sglang_url + "/v1/chat/completions"
            return run_wrk(url, body, lua, conc, secs, think)

        print(f"# gateway overhead: {seconds}s x {rounds} round(s) per cell, instant backends x{len(bports)}, "
              f"{os.cpu_count()} CPUs, ai-lb workers={a.workers} completions={a.completions}, "
              f"sglang-router --policy {a.sglang_policy}", flush=True)
        results = []
        for label, size, conc, think in cases:
            body = tmp / f"body{size}.json"
            body.write_bytes(chat_body(size))
            for col in columns:
                run(col, body, conc, 1, think)  # warm-up
            runs: dict[str, list[dict]] = {c: [] for c in columns}
            for _ in range(rounds):
                for col in columns:
                    runs[col].append(run(col, body, conc, seconds, think))
            row = {"case": label, "body_bytes": size, "concurrency": conc, "think_ms": think}
            for col, rs in runs.items():
                for k in ("p50", "p90", "p99", "rps", "cpu_us_ai-lb", "cpu_us_floor", "machine_busy"):
                    vals = [r[k] for r in rs if r.get(k) is not None]
                    if vals:
                        row[f"{col} {k}"] = statistics.median(vals)
                row[f"{col} errors"] = sum(r["non2xx"] for r in rs)
                row[f"{col} ext_proc_failed"] = sum(r.get("ext_proc_failed", 0) for r in rs)
            results.append(row)
            print(_line(row, columns), flush=True)
        print()
        print(table(results, columns))
        print()
        for line in targets(results):
            print(line)
        dps = decisions_per_second()
        print()
        for k, v in dps.items():
            print(f"in-process decisions/s on one core, {k}: {v:,.0f}")
        if a.json:
            a.json.write_text(json.dumps({"overhead": results, "decisions_per_second": dps,
                                          "workers": a.workers, "completions": a.completions}, indent=2))
        return 0
    finally:
        if sglang is not None:
            sglang.stop()
        for p in reversed(procs):
            p.stop()


# Imports ai-lb from another source tree, ahead of the editable install's finder.
_LAUNCH = ("import sys; src = sys.argv.pop(1); "
           "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
           "sys.path.insert(0, src); sys.argv[0] = 'ai-lb'; from extproc.cli import main; sys.exit(main())")


def _start_from(src: Path, tmp: Path, cfg: Path, grpc: int) -> ds.Proc:
    p = ds.spawn("ai-lb", [ds.PY, "-c", _LAUNCH, str(src.resolve()), "serve", "-c", str(cfg)], tmp)
    ds.wait_port(grpc, proc=p)
    return p


def _start_floor(tmp: Path, bports: list[int], procs: list) -> tuple[str, int, int]:
    """The floor column: the ext_proc floor server behind a gateway Envoy of its own."""
    d = tmp / "floor"
    d.mkdir()
    fport, listen, admin = ds.free_ports(3)
    procs.append(ext_proc_floor.start(d, fport, [f"127.0.0.1:{p}" for p in bports]))
    pid = procs[-1].p.pid
    procs.append(ds.start_envoy(d, ds.EnvoyPorts(listen, admin, fport), bports, message_timeout=2.0))
    ds.wait_cluster_healthy(admin, "llm_backends", len(bports))
    return f"http://127.0.0.1:{listen}", admin, pid


def _failed_calls(admin: int) -> int:
    _, text = ds.http_get(f"http://127.0.0.1:{admin}/stats?filter=ext_proc.streams_failed")
    return sum(int(line.rsplit(":", 1)[1]) for line in text.splitlines() if ":" in line)


def _checked(admin: int, run) -> dict:
    """A run through ext_proc, with the calls Envoy counted failed during it (they fell open)."""
    before = _failed_calls(admin)
    r = run()
    r["ext_proc_failed"] = _failed_calls(admin) - before
    return r


def _line(row: dict, columns) -> str:
    cells = [f"{c} {row.get(f'{c} p50', 0):.2f}/{row.get(f'{c} p99', 0):.2f} ms {row.get(f'{c} rps', 0):.0f} rps"
             + (f" ({row[f'{c} ext_proc_failed']} ext_proc calls FAILED)" if row.get(f"{c} ext_proc_failed") else "")
             for c in columns]
    return f"{row['case']:>26}: " + " | ".join(cells)


def table(results: list[dict], columns) -> str:
    head = "| case | " + " | ".join(f"{c} p50 / p99 (ms), req/s" for c in columns) + \
        " | CPU per request (µs): floor / ai-lb rr / ai-lb prefix |"
    out = [head, "|---" * (len(columns) + 2) + "|"]
    for r in results:
        cells = [f"{r.get(f'{c} p50', float('nan')):.2f} / {r.get(f'{c} p99', float('nan')):.2f}, "
                 f"{r.get(f'{c} rps', float('nan')):,.0f}" for c in columns]
        cpu = " / ".join(f"{r[k]:.0f}" if r.get(k) is not None else "-"
                         for k in ("floor cpu_us_floor", "ai-lb:round_robin cpu_us_ai-lb", "ai-lb:prefix_cache cpu_us_ai-lb"))
        out.append(f"| {r['case']} | " + " | ".join(cells) + f" | {cpu} |")
    return "\n".join(out)


def targets(results: list[dict]) -> list[str]:
    """The issue's targets, met or missed, from this run."""
    by = {r["case"]: r for r in results}
    out = []

    def get(case, col, k):
        return by.get(case, {}).get(f"{col} {k}")

    def verdict(ok):
        return "met" if ok else "MISSED"

    for col in ("floor", "ai-lb:round_robin", "ai-lb:prefix_cache"):
        nat, lb = get("1 KB, c=1", "envoy-rr", "p50"), get("1 KB, c=1", col, "p50")
        if nat and lb:
            out.append(f"1 KB c=1 p50 <= 1.3x Envoy RR, {col}: {lb / nat:.2f}x ({lb:.2f} vs {nat:.2f} ms): "
                       f"{verdict(lb / nat <= 1.3)}")
        case = "1 KB, c=32, 40 ms think"
        if get(case, col, "p50") is not None and get(case, "envoy-rr", "p50") is not None:
            d50 = get(case, col, "p50") - get(case, "envoy-rr", "p50")
            d99 = get(case, col, "p99") - get(case, "envoy-rr", "p99")
            out.append(f"1 KB c=32 ~700 rps, {col}: added p50 {d50:+.2f} ms (<= 0.3: {verdict(d50 <= 0.3)}), "
                       f"added p99 {d99:+.2f} ms (<= 1.5: {verdict(d99 <= 1.5)})")
        case = "1 KB, c=32, flat out"
        if get(case, col, "rps") and get(case, "envoy-rr", "rps"):
            ratio = get(case, col, "rps") / get(case, "envoy-rr", "rps")
            out.append(f"flat out req/s >= 0.85x Envoy RR, {col}: {ratio:.2f}x: {verdict(ratio >= 0.85)}")
    case = "220 KB, c=20, 40 ms think"
    if get(case, "ai-lb:prefix_cache", "p50") is not None and get(case, "envoy-rr", "p50") is not None:
        d50 = get(case, "ai-lb:prefix_cache", "p50") - get(case, "envoy-rr", "p50")
        d99 = get(case, "ai-lb:prefix_cache", "p99") - get(case, "envoy-rr", "p99")
        out.append(f"220 KB c=20, prefix_cache: added p50 {d50:+.2f} ms (<= 1.5: {verdict(d50 <= 1.5)}), "
                   f"added p99 {d99:+.2f} ms (<= 5: {verdict(d99 <= 5)})")
    cpus = [(r["case"], r["ai-lb:round_robin cpu_us_ai-lb"]) for r in results if r.get("ai-lb:round_robin cpu_us_ai-lb")]
    for case, us in cpus:
        out.append(f"ai-lb CPU per request, round_robin, {case}: {us:.0f} µs (<= 50: {verdict(us <= 50)})")
    return out


def decisions_per_second(seconds: float = 2.0) -> dict[str, float]:
    """The Python cost of one decision, without gRPC transport: parse the serialized Envoy
    message, run the handler (context, policy, answer) and serialize the answer."""
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from google.protobuf import struct_pb2

    from extproc.envoy.processor import Processor
    from extproc.runtime import Runtime, parse_config
    from extproc.telemetry import Telemetry

    from .decisions import Stream  # the in-process stand-in for Envoy's stream

    hdrs = pb.HttpHeaders(end_of_stream=False)
    for k, v in [(":method", "POST"), (":path", "/v1/chat/completions"), (":authority", "llm.example"),
                 (":scheme", "http"), ("content-type", "application/json"), ("content-length", "1024"),
                 ("user-agent", "bench"), ("accept", "*/*"), ("x-request-id", "0f5b8d58-8f4e-4c8e-9d0e-5b1c2a3d4e5f"),
                 ("x-forwarded-proto", "http"), ("authorization", "Bearer sk-xxxx"), ("x-envoy-expected-rq-timeout-ms", "300000"),
                 ("accept-encoding", "gzip"), ("connection", "keep-alive"), ("x-b3-traceid", "abc")]:
        hdrs.headers.headers.append(base_pb2.HeaderValue(key=k, raw_value=v.encode()))
    req = pb.ProcessingRequest(request_headers=hdrs)
    s = struct_pb2.Struct()
    s.fields["xds.route_name"].string_value = "llm"
    req.attributes["envoy.filters.http.ext_proc"].CopyFrom(s)
    raw_headers = req.SerializeToString()
    raw_body = pb.ProcessingRequest(request_body=pb.HttpBody(body=chat_body(1024), end_of_stream=True)).SerializeToString()

    out = {}
    for pol, msgs in (("round_robin", [raw_headers]), ("least_request", [raw_headers]),
                      ("prefix_cache (headers + 1 KB body)", [raw_body, raw_headers])):
        name = pol.split()[0]
        cfg = parse_config(f"routes: {{llm: {{lb_policy: {name}, endpoints: "
                           "{static: ['10.0.0.1:8000','10.0.0.2:8000','10.0.0.3:8000','10.0.0.4:8000']}}}")

        async def go() -> float:
            tel = Telemetry()
            rt = Runtime()
            rt.load.inflight.on_change = tel.set_inflight
            await rt.apply(cfg)
            p = Processor(rt, tel, rt.load)
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                for _ in range(200):
                    await p.Process(None, Stream(list(msgs)))
                n += 200
                await asyncio.sleep(0)
            return n / (time.perf_counter() - t0)

        out[pol] = asyncio.run(go())
    return out


if __name__ == "__main__":
    sys.exit(main())
