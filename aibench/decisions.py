"""Decision latency per policy, memory store vs Redis, at 8, 64, 512 and 1,000 endpoints.

Times ``Processor.Process`` for one request (headers, plus a chat body for policies that
read it) in-process, so it includes context, policy, counts store and answer, but not
the HTTP/2 transport (see ``aibench.overhead`` for that). Redis is a real redis-server on
loopback, started here.

    python -m aibench.decisions [--seconds 1.5] [--policies a,b] [--endpoints 8,1000] [--stores memory]
    python -m aibench.decisions --tree-memory 1000000   # the block tree's bytes per node
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from extproc.envoy.processor import Processor
from extproc.policies import registry
from extproc.runtime import Runtime, build_config
from extproc.signals import EndpointMetrics
from extproc.telemetry import Telemetry

from .redis_server import RedisServer

POLICIES = {  # name -> lb_config
    "round_robin": {},
    "least_request": {},
    "request_num": {},
    "power_of_two": {},
    "process_tokens": {},
    "fd_metrics_score": {},
    "least_kv_cache": {},
    "global_least_request": {},
    "prefix_cache": {},
    "cache_aware": {},
    "estimated_ttft": {"sample": 0},
    "endpoint_metrics": {"metric_policy": "default"},
}
USES_METRICS = ("endpoint_metrics", "fd_metrics_score", "least_kv_cache", "cache_aware", "estimated_ttft")


BODY_KB = 0  # --body-kb: one long user turn of this size instead of the default chat


def messages(i: int) -> bytes:
    if BODY_KB:
        doc = ("retrieved passage %d about the topic at hand. " % (i % 7)) * (BODY_KB * 1024 // 45)
        return json.dumps({"model": "m", "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                                      {"role": "user", "content": doc + f" question {i}"}],
                           "max_tokens": 16}).encode()
    conv = [{"role": "system", "content": "You are a helpful assistant. " * 20}]
    for t in range(3):
        conv += [{"role": "user", "content": f"question {t} of user {i % 50}"}, {"role": "assistant", "content": "answer " * 30}]
    conv.append({"role": "user", "content": f"final question {i}"})
    return json.dumps({"model": "m", "messages": conv, "max_tokens": 16}).encode()


def headers_msg(eos: bool) -> bytes:
    h = pb.HttpHeaders(end_of_stream=eos)
    for k, v in [(":method", "POST"), (":path", "/v1/chat/completions"), ("content-type", "application/json")]:
        h.headers.headers.append(base_pb2.HeaderValue(key=k, raw_value=v.encode()))
    req = pb.ProcessingRequest(request_headers=h)
    s = struct_pb2.Struct()
    s.fields["xds.route_name"].string_value = "llm"
    req.attributes["envoy.filters.http.ext_proc"].CopyFrom(s)
    return req.SerializeToString()


class Stream:
    def __init__(self, msgs):
        self.msgs = msgs

    async def read(self):
        return pb.ProcessingRequest.FromString(self.msgs.pop()) if self.msgs else grpc.aio.EOF

    async def write(self, m):
        m.SerializeToString()


async def measure(policy: str, store: str, n_eps: int, seconds: float) -> list[float]:
    eps = [f"10.{i // 250}.{i % 250}.1:8000" for i in range(n_eps)]
    cfg = build_config({"store": store, "routes": {"llm": {"lb_policy": policy, "lb_config": POLICIES[policy],
                                                            "endpoints": {"static": eps}}}})
    tel = Telemetry()
    rt = Runtime()
    await rt.apply(cfg)
    pol = rt.routes["llm"].policy
    needs_body = pol.needs_body
    if policy in USES_METRICS:
        # The endpoints are fictitious: hand the load view fresh, varied scrapes, as the
        # scraper service would (every 100 ms, off the request path).
        import random as _r

        def feed() -> None:
            for a in eps:
                rt.load.on_scrape(a, EndpointMetrics(
                    {"vllm:num_requests_waiting": _r.randint(0, 5), "vllm:num_requests_running": _r.randint(0, 20),
                     "vllm:kv_cache_usage_perc": _r.random()}, block_size=16, num_blocks=65536))
        feed()
    p = Processor(rt, tel, rt.load)
    hdr_eos, hdr = headers_msg(True), headers_msg(False)
    bodies = [pb.ProcessingRequest(request_body=pb.HttpBody(body=messages(i), end_of_stream=True)).SerializeToString()
              for i in range(200)]
    lat = []
    i = 0
    deadline = time.perf_counter() + seconds
    next_feed = time.perf_counter() + 0.1
    while time.perf_counter() < deadline:
        if policy in USES_METRICS and time.perf_counter() > next_feed:
            feed()  # not timed: scrapes arrive off the request path
            next_feed = time.perf_counter() + 0.1
        msgs = [bodies[i % 200], hdr] if needs_body else [hdr_eos]
        t0 = time.perf_counter()
        await p.Process(None, Stream(msgs))
        lat.append(time.perf_counter() - t0)
        i += 1
        await asyncio.sleep(0)  # untimed: work a policy deferred off the request path (call_soon) runs here
    await rt.close()
    return lat


def tree_memory(nodes: int) -> None:
    """The block tree's memory (cache_aware, estimated_ttft): ``nodes`` chain keys spread
    over 4 endpoints, 1,000-block chains, as tracemalloc counts it."""
    import tracemalloc

    from extproc.state.block_index import BlockIndex

    tracemalloc.start()
    idx = BlockIndex(max_blocks=nodes)
    for i in range(0, nodes, 1000):
        idx.record(range(i * 7919, i * 7919 + 1000), f"10.0.0.{i % 4}:8000")
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"block tree: {len(idx):,} nodes, {used / 2**20:.0f} MiB traced, "
          f"{used / len(idx):.0f} bytes per node ({used / len(idx) * 1e6 / 2**20:.0f} MiB per million)")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tree-memory", type=int, default=0, metavar="NODES",
                    help="only measure the block tree's memory with this many nodes (e.g. 1000000)")
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--endpoints", default="8,64,512,1000")
    ap.add_argument("--stores", default="memory,redis")
    ap.add_argument("--body-kb", type=int, default=0, help="one long prompt of this many KB (e.g. 220)")
    a = ap.parse_args()
    if a.tree_memory:
        tree_memory(a.tree_memory)
        return 0
    global BODY_KB
    BODY_KB = a.body_kb
    srv = RedisServer(Path(tempfile.mkdtemp())).start()
    try:
        print("| policy | store | endpoints | p50 (µs) | p99 (µs) | decisions/s |")
        print("|---|---|---|---|---|---|")
        for policy in a.policies.split(","):
            try:
                registry.get(policy)
            except KeyError:
                print(f"| {policy} | - | - | not available | | |")
                continue
            stores = [srv.url if s == "redis" else s for s in a.stores.split(",")]
            if policy not in ("global_least_request", "prefix_cache"):
                stores = [s for s in stores if s == "memory"]  # the others keep no state in a store
            for store in stores:
                for n in map(int, a.endpoints.split(",")):
                    lat = asyncio.run(measure(policy, store, n, a.seconds))
                    q = statistics.quantiles(lat, n=100)
                    print(f"| {policy} | {'redis' if store != 'memory' else 'memory'} | {n} | {q[49] * 1e6:.0f} | "
                          f"{q[98] * 1e6:.0f} | {len(lat) / sum(lat):,.0f} |", flush=True)
    finally:
        srv.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
