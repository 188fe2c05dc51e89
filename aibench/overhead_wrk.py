"""The overhead benchmark's parts: instant backends, request bodies, and ``wrk`` runs with
the CPU a process tree spent during each (``/proc``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import yaml

from . import devstack as ds
from .monitor import CpuMonitor

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


def start_instant_backends(tmp: Path, admin: int, ports: list[int]) -> ds.Proc:
    """One Envoy (one worker) answering on every port of ``ports`` at once."""
    (tmp / "backends.yaml").write_text(yaml.safe_dump(instant_backends_config(admin, ports)))
    p = ds.spawn("backends", [ds.envoy_binary(), "-c", str(tmp / "backends.yaml"), "--concurrency", "1",
                              "--use-dynamic-base-id", "--log-level", "warn"], tmp)
    for port in ports:
        ds.wait_port(port, proc=p)
    return p


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


def run_wrk(url: str, body_file: Path, lua: Path, conc: int, seconds: float, think_ms: float = 0,
            cpu_of: dict[str, int | list[int]] | None = None) -> dict:
    """One closed-loop wrk run (one thread, ``conc`` connections). ``cpu_of``: components
    whose CPU (process trees, from /proc) is reported per request (``cpu_us_<name>``)."""
    env = dict(os.environ, BODY_FILE=str(body_file), THINK_MS=str(think_ms))
    argv = ["wrk", "-t1", f"-c{conc}", f"-d{max(1, round(seconds))}s", "--latency", "-s", str(lua), url]
    mon = CpuMonitor(cpu_of or {}, interval=0.5)
    with mon:
        out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=seconds + 30).stdout
    pct = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    r = {"p50": parse_ms(pct["50"]), "p90": parse_ms(pct["90"]), "p99": parse_ms(pct["99"]), "rps": rps,
         "requests": total, "non2xx": int(non2xx.group(1)) if non2xx else 0,
         "socket_errors": errors.group(1) if errors else ""}
    rep = mon.report()
    r["machine_busy"] = rep["machine_busy_mean"]
    for name in cpu_of or {}:
        c = rep["components"].get(name)
        r[f"cpu_us_{name}"] = c["cpu_s"] / max(total, 1) * 1e6 if c else None
    return r
