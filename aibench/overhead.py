"""Gateway overhead: Envoy + ai-lb against Envoy's native round robin, in one run.

Instant backends (an Envoy answering with ``direct_response``) isolate the cost of the
gateway. The same gateway Envoy serves both variants: ``/native/...`` has ext_proc off,
``/...`` goes through ai-lb, and runs alternate between them so machine noise hits both.
Load comes from ``wrk`` (closed loop, fixed connections = concurrency).

    python -m aibench.overhead               # full run (~2 min)
    python -m aibench.overhead --quick       # shorter runs

Prints a table; copy it into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from . import devstack as ds

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open(os.getenv("BODY_FILE"), "rb"); wrk.body = f:read("*a"); f:close()
local think = tonumber(os.getenv("THINK_MS") or "0")
function delay() return think end
"""
CANNED = json.dumps({"id": "cmpl-1", "object": "chat.completion", "model": "m",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}})


def instant_backends_config(admin: int, ports: list[int]) -> dict:
    listeners = []
    for p in ports:
        listeners.append({
            "name": f"b{p}", "address": {"socket_address": {"address": "127.0.0.1", "port_value": p}},
            "per_connection_buffer_limit_bytes": 16 << 20,
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": f"b{p}",
                "route_config": {"virtual_hosts": [{"name": "b", "domains": ["*"], "routes": [{
                    "match": {"prefix": "/"},
                    "direct_response": {"status": 200, "body": {"inline_string": CANNED}},
                    "response_headers_to_add": [{"header": {"key": "x-sim-server", "value": str(p)}}]}]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]})
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {"listeners": listeners}}


def chat_body(size: int) -> bytes:
    msg = {"model": "m", "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                      {"role": "user", "content": ""}], "max_tokens": 16}
    filler = size - len(json.dumps(msg))
    msg["messages"][1]["content"] = ("lorem ipsum dolor sit amet " * (filler // 27 + 1))[:max(filler, 0)]
    return json.dumps(msg).encode()


def parse_ms(v: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", v)
    n, unit = float(m.group(1)), m.group(2)
    return n / 1000 if unit == "us" else n * 1000 if unit == "s" else n


def run_wrk(url: str, body_file: Path, lua: Path, conc: int, seconds: float, think_ms: float = 0) -> dict:
    env = dict(os.environ, BODY_FILE=str(body_file), THINK_MS=str(think_ms))
    out = subprocess.run(["wrk", "-t1", f"-c{conc}", f"-d{max(1, round(seconds))}s", "--latency", "-s", str(lua), url],
                         capture_output=True, text=True, env=env, timeout=seconds + 30).stdout
    pct = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"p50": parse_ms(pct["50"]), "p90": parse_ms(pct["90"]), "p99": parse_ms(pct["99"]), "rps": rps,
            "non2xx": int(non2xx.group(1)) if non2xx else 0, "socket_errors": errors.group(1) if errors else ""}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write results here")
    ap.add_argument("--think-ms", type=float, default=None,
                    help="pause per connection between requests (default 40): keeps the 2-core machine "
                         "below saturation so latency measures the gateway, not CPU queueing; 0 = flat out")
    a = ap.parse_args()
    if not shutil.which("wrk"):
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    seconds = a.seconds or (3 if a.quick else 6)
    rounds = a.rounds or (1 if a.quick else 2)
    think_modes = [40.0, 0.0] if a.think_ms is None else [a.think_ms]
    tmp = Path(tempfile.mkdtemp(prefix="ai-lb-bench-"))
    procs: list[ds.Proc] = []
    try:
        bports = ds.free_ports(4)
        badmin, listen, admin, grpc, metrics = ds.free_ports(5)
        (tmp / "backends.yaml").write_text(yaml.safe_dump(instant_backends_config(badmin, bports)))
        procs.append(ds.spawn("backends", [ds.envoy_binary(), "-c", str(tmp / "backends.yaml"), "--concurrency", "1",
                                           "--use-dynamic-base-id", "--log-level", "warn"], tmp))
        for p in bports:
            ds.wait_port(p, proc=procs[-1])
        ports = ds.EnvoyPorts(listen, admin, grpc)
        procs.append(ds.start_envoy(tmp, ports, bports, message_timeout=2.0))
        ds.wait_cluster_healthy(admin, "llm_backends", len(bports))
        cfg_path = tmp / "ai-lb.yaml"
        route = lambda pol: {"llm": {"lb_policy": pol, "endpoints": {"cluster": "llm_backends"}}}  # noqa: E731
        ds.write_ai_lb_config(cfg_path, grpc, metrics, route("round_robin"), envoy_admin_port=admin,
                              log_level="warning", server={"fallback_log_interval": 10.0, "reload_interval": 0.2})
        procs.append(ds.start_ai_lb(tmp, cfg_path, grpc))
        time.sleep(1.0)
        lua = tmp / "post.lua"
        lua.write_text(LUA)
        base = f"http://127.0.0.1:{listen}"
        results = []
        cases = [("1 KB chat body", 1024, 32), ("220 KB chat body", 220 * 1024, 20)]
        policies = [("round_robin", "headers only"), ("prefix_cache", "reads the body")]
        print(f"# gateway overhead: {seconds}s x {rounds} round(s) per cell, instant backends x{len(bports)}, "
              f"{os.cpu_count()} CPUs", flush=True)
        for think in think_modes:
            for label, size, conc in cases:
                body = tmp / f"body{size}.json"
                body.write_bytes(chat_body(size))
                for pol, what in policies:
                    ds.write_ai_lb_config(cfg_path, grpc, metrics, route(pol), envoy_admin_port=admin,
                                          log_level="warning",
                                          server={"fallback_log_interval": 10.0, "reload_interval": 0.2})
                    time.sleep(0.8)
                    run_wrk(base + "/v1/chat/completions", body, lua, conc, 1, think)  # warm-up
                    nat, lb = [], []
                    for _ in range(rounds):
                        nat.append(run_wrk(base + "/native/v1/chat/completions", body, lua, conc, seconds, think))
                        lb.append(run_wrk(base + "/v1/chat/completions", body, lua, conc, seconds, think))
                    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
                    row = {"case": label, "concurrency": conc, "think_ms": think, "policy": pol, "policy_kind": what,
                           **{f"native_{k}": med(nat, k) for k in ("p50", "p90", "p99", "rps")},
                           **{f"ai_lb_{k}": med(lb, k) for k in ("p50", "p90", "p99", "rps")},
                           "errors": sum(r["non2xx"] for r in nat + lb)}
                    row["added_p50_ms"] = row["ai_lb_p50"] - row["native_p50"]
                    row["added_p99_ms"] = row["ai_lb_p99"] - row["native_p99"]
                    results.append(row)
                    print(f"{label:>16} c={conc:<3} think={think:<4.0f} {pol:<15} native p50 {row['native_p50']:.2f} "
                          f"p99 {row['native_p99']:.2f} ({row['native_rps']:.0f} rps) | ai-lb p50 {row['ai_lb_p50']:.2f} "
                          f"p99 {row['ai_lb_p99']:.2f} ({row['ai_lb_rps']:.0f} rps) | added p50 {row['added_p50_ms']:+.2f} ms "
                          f"p99 {row['added_p99_ms']:+.2f} ms | non-2xx {row['errors']}", flush=True)
        print()
        print("| body | conc | think | ai-lb policy | native p50 / p99 (ms) | ai-lb p50 / p99 (ms) | added p50 | added p99 | rps native / ai-lb |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['case']} | {r['concurrency']} | {r['think_ms']:.0f} ms | {r['policy']} ({r['policy_kind']}) | {r['native_p50']:.2f} / {r['native_p99']:.2f} "
                  f"| {r['ai_lb_p50']:.2f} / {r['ai_lb_p99']:.2f} | {r['added_p50_ms']:+.2f} ms | {r['added_p99_ms']:+.2f} ms "
                  f"| {r['native_rps']:.0f} / {r['ai_lb_rps']:.0f} |")
        dps = decisions_per_second()
        print()
        for k, v in dps.items():
            print(f"in-process decisions/s on one core, {k}: {v:,.0f}")
        if a.json:
            a.json.write_text(json.dumps({"overhead": results, "decisions_per_second": dps}, indent=2))
        return 0
    finally:
        for p in reversed(procs):
            p.stop()


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
            return n / (time.perf_counter() - t0)

        out[pol] = asyncio.run(go())
    return out


if __name__ == "__main__":
    sys.exit(main())
