"""Failure drills under load, on loopback: ``python -m aibench.drill``.

One stack (three simulated vLLM servers, the reference Envoy, one ai-lb running
``global_least_request`` on a real redis-server) and closed-loop chat traffic (a third of
it streaming) during each drill:

* ``ai-lb-kill``    ai-lb gets SIGKILL, and is started again 2 s later;
* ``redis-kill``    redis-server gets SIGKILL (its counts are lost), and is started again;
* ``redis-stop``    redis-server gets SIGSTOP (a hung Redis: calls time out), then SIGCONT;
* ``backend-kill``  one simulated backend crashes (connections reset), back 2.5 s later.

Each prints the requests sent and failed (streaming / not), and, once the traffic has
stopped, the in-flight counts left: ai-lb's ``ai_lb_inflight_requests`` and the Redis
counts of the global_least_request pool. Targets (docs/reliability.md): 0 client-visible
failures for an ai-lb or Redis failure; for a killed backend, failures <= the requests it
had in flight and none of them non-streaming (Envoy retries those on another host); every
in-flight count back to exactly 0. Exit status 0 when every target is met.
Everything runs on 127.0.0.1, each drill is bounded in time, and everything started here
is stopped in ``finally``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from . import devstack as ds
from .demo_stack import wait_until
from .redis_server import RedisServer

CHAT = "/v1/chat/completions"
DRILLS = ("ai-lb-kill", "redis-kill", "redis-stop", "backend-kill")
POOL = "llm|llm_backends"
MODEL = "sim-model"


@dataclass
class Tally:
    sent: int = 0
    failed_stream: int = 0
    failed_json: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        return self.failed_stream + self.failed_json

    def fail(self, stream: bool, why: str) -> None:
        if stream:
            self.failed_stream += 1
        else:
            self.failed_json += 1
        self.errors[why] = self.errors.get(why, 0) + 1


async def _load(url: str, seconds: float, concurrency: int, tally: Tally) -> None:
    import aiohttp

    deadline = time.monotonic() + seconds
    counter = iter(range(10**9))

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in counter:
            if time.monotonic() >= deadline:
                return
            stream = i % 3 == 0
            body = {"model": MODEL, "max_tokens": (40, 400, 120, 800)[i % 4], "stream": stream,
                    "messages": [{"role": "user", "content": f"drill request {i}"}]}
            tally.sent += 1
            try:
                async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=30)) as r:
                    data = await r.read()
                    if r.status != 200:
                        tally.fail(stream, f"HTTP {r.status}")
                    elif stream and b"data: [DONE]" not in data:
                        tally.fail(stream, "stream cut")
            except Exception as e:  # noqa: BLE001 - every client-visible failure counts
                tally.fail(stream, type(e).__name__)

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))


class Drills:
    """The stack and the four drills; ``close`` stops every process."""

    def __init__(self, tmp: Path, time_scale: float) -> None:
        self.tmp = tmp
        self.backends = ds.free_ports(3)
        listen, admin, grpc, self.metrics_port = ds.free_ports(4)
        self.ports = ds.EnvoyPorts(listen, admin, grpc)
        self.procs: list[ds.Proc] = []
        self.redis = RedisServer(tmp)
        self.ai_lb: ds.Proc | None = None
        self.redis.start()
        self.procs.append(ds.start_sim(tmp, self.backends, "--model", MODEL, "--time-scale", str(time_scale),
                                       "--admin-port", "-1", "--seed", "1"))
        self.procs.append(ds.start_envoy(tmp, self.ports, self.backends))
        ds.wait_cluster_healthy(admin, "llm_backends", 3, timeout=20)
        self.config = ds.write_ai_lb_config(
            tmp / "ai-lb.yaml", grpc, self.metrics_port,
            {"llm": {"lb_policy": "global_least_request", "lb_config": {"lease_ttl": 2.0},
                     "endpoints": {"cluster": "llm_backends"}}},
            envoy_admin_port=admin, store=self.redis.url)
        self.start_ai_lb()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports.listen}{CHAT}"

    def start_ai_lb(self) -> None:
        self.ai_lb = ds.start_ai_lb(self.tmp, self.config, self.ports.ai_lb)
        self.procs.append(self.ai_lb)
        wait_until(lambda: all(ds.envoy_host_health(self.ports.admin, "ai_lb").values() or [False]), 15,
                   "Envoy does not see ai-lb healthy")
        wait_until(lambda: self.metric("ai_lb_route_endpoints", state="healthy") >= 3, 15,
                   "ai-lb does not see 3 healthy endpoints")

    def close(self) -> None:
        for p in reversed(self.procs):
            try:
                p.stop(timeout=3)
            except BaseException:  # noqa: BLE001 - a second Ctrl-C must not leave processes behind
                p.p.kill()
        try:
            import os
            os.kill(self.redis.proc.pid, signal.SIGCONT)  # in case a drill was interrupted mid-stop
        except (AttributeError, ProcessLookupError, TypeError):
            pass
        self.redis.kill()

    # -- reading state -----------------------------------------------------------------
    def metric(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        try:
            _, text = ds.http_get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=1)
        except OSError:
            return float("nan")
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def redis_counts(self) -> float:
        from extproc.state.redis_counts import pool_keys
        from extproc.state.resp import RespClient

        async def read() -> float:
            c = RespClient.from_url(self.redis.url)
            try:
                total = await c.hgetall(pool_keys(POOL)[0])
                return float(sum(int(v) for v in total.values()))
            finally:
                await c.aclose()

        try:
            return asyncio.run(read())
        except Exception:  # noqa: BLE001 - Redis down
            return float("nan")

    def backend_inflight(self, i: int) -> int:
        from prometheus_client.parser import text_string_to_metric_families

        _, text = ds.http_get(f"http://127.0.0.1:{self.backends[i]}/metrics", timeout=1)
        return int(sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                       if s.name in ("vllm:num_requests_running", "vllm:num_requests_waiting")))

    # -- one drill -----------------------------------------------------------------------
    def run(self, name: str, seconds: float, concurrency: int) -> dict:
        tally = Tally()
        local0 = self.metric("ai_lb_state_events_total", event="local_pick")
        t = threading.Thread(target=lambda: asyncio.run(_load(self.url, seconds, concurrency, tally)), daemon=True)
        t.start()
        time.sleep(seconds * 0.3)
        target_inflight = getattr(self, "_" + name.replace("-", "_"))(seconds)
        t.join(seconds + 60)
        local = self.metric("ai_lb_state_events_total", event="local_pick") - local0
        inflight, counts = self.settle()
        extra = self._ejected_after if name == "backend-kill" else None
        return {"drill": name, "local_picks": None if name == "ai-lb-kill" else local, "ejected_after_s": extra, "sent": tally.sent, "failed": tally.failed, "failed_stream": tally.failed_stream,
                "failed_json": tally.failed_json, "errors": tally.errors, "target_inflight": target_inflight,
                "ai_lb_inflight_after": inflight, "redis_counts_after": counts}

    def settle(self, timeout: float = 8.0) -> tuple[float, float]:
        """In-flight counts once traffic has stopped (polled: leases and resyncs take a moment)."""
        deadline = time.monotonic() + timeout
        while True:
            inflight, counts = self.metric("ai_lb_inflight_requests"), self.redis_counts()
            if (inflight == 0 and counts == 0) or time.monotonic() > deadline:
                return inflight, counts
            time.sleep(0.2)

    def _ai_lb_kill(self, seconds: float) -> None:
        assert self.ai_lb is not None
        self.ai_lb.kill()
        time.sleep(min(2.0, seconds * 0.3))
        self.start_ai_lb()

    def _redis_kill(self, seconds: float) -> None:
        self.redis.kill()
        time.sleep(min(2.0, seconds * 0.3))
        self.redis.start()

    def _redis_stop(self, seconds: float) -> None:
        import os

        os.kill(self.redis.proc.pid, signal.SIGSTOP)
        time.sleep(min(2.0, seconds * 0.3))
        os.kill(self.redis.proc.pid, signal.SIGCONT)

    def _backend_kill(self, seconds: float) -> int:
        n = self.backend_inflight(0)
        req = urllib.request.Request(f"http://127.0.0.1:{self.backends[0]}/sim/crash", method="POST",
                                     data=json.dumps({"restart_after_s": 2.5}).encode(),
                                     headers={"content-type": "application/json"})
        urllib.request.urlopen(req, timeout=2).read()
        t0 = time.monotonic()
        self._ejected_after = None
        addr = f"127.0.0.1:{self.backends[0]}"
        while time.monotonic() - t0 < 2.0:  # how long until Envoy's outlier detection ejects it
            _, body = ds.http_get(f"http://127.0.0.1:{self.ports.admin}/clusters?format=json", timeout=1)
            if any(f"{h['address']['socket_address']['address']}:{h['address']['socket_address']['port_value']}" == addr
                   and h.get("health_status", {}).get("failed_outlier_check")
                   for c in json.loads(body)["cluster_statuses"] if c["name"] == "llm_backends"
                   for h in c.get("host_statuses", [])):
                self._ejected_after = time.monotonic() - t0
                break
            time.sleep(0.01)
        return n


def verdict(r: dict) -> tuple[bool, str]:
    zero = r["ai_lb_inflight_after"] == 0 and r["redis_counts_after"] == 0
    if r["drill"] == "backend-kill":
        ok = r["failed"] <= r["target_inflight"] and r["failed_json"] == 0
        what = f"failures <= {r['target_inflight']} in flight on the backend, none non-streaming"
    else:
        ok = r["failed"] == 0
        what = "0 failures"
    return ok and zero, f"{what}, in-flight back to 0: {'met' if ok and zero else 'NOT met'}"


def report(results: list[dict]) -> None:
    print(f"{'drill':<14}{'requests':>9}{'failed':>8}{'stream':>8}{'json':>6}{'in flight on target':>21}"
          f"{'ai-lb in-flight after':>23}{'redis counts after':>20}")
    for r in results:
        tgt = "-" if r["target_inflight"] is None else str(r["target_inflight"])
        print(f"{r['drill']:<14}{r['sent']:>9}{r['failed']:>8}{r['failed_stream']:>8}{r['failed_json']:>6}{tgt:>21}"
              f"{r['ai_lb_inflight_after']:>23.0f}{r['redis_counts_after']:>20.0f}")
    for r in results:
        ok, text = verdict(r)
        errs = ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())) or "none"
        more = ""
        if r.get("local_picks"):
            more += f"; {r['local_picks']:.0f} picks made with local counts while Redis was out"
        if r.get("ejected_after_s") is not None:
            more += f"; Envoy ejected the backend {r['ejected_after_s'] * 1000:.0f} ms after the crash"
        print(f"  {r['drill']}: target {text}; errors: {errs}{more}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aibench.drill", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Failure drills under load on loopback (see the module docstring).")
    p.add_argument("--drills", default=",".join(DRILLS), help="comma-separated, from: " + ", ".join(DRILLS))
    p.add_argument("--seconds", type=float, default=8.0, help="traffic per drill (the failure starts at 30 %%)")
    p.add_argument("--concurrency", type=int, default=24, help="concurrent client requests")
    p.add_argument("--time-scale", type=float, default=0.2, help="simulator wall seconds per simulated second")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)
    names = [d.strip() for d in a.drills.split(",") if d.strip()]
    unknown = set(names) - set(DRILLS)
    if unknown:
        p.error(f"unknown drill(s): {', '.join(sorted(unknown))}")
    tmp = Path(tempfile.mkdtemp(prefix="ai-lb-drill-"))
    d = None
    results = []
    try:
        d = Drills(tmp, a.time_scale)
        for name in names:
            print(f"==> {name}: {a.seconds:.0f} s of traffic at concurrency {a.concurrency}", flush=True)
            results.append(d.run(name, a.seconds, a.concurrency))
            ds.wait_cluster_healthy(d.ports.admin, "llm_backends", 3, timeout=20)
    finally:
        if d is not None:
            d.close()
        print(f"logs: {tmp}")
    report(results)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0 if all(verdict(r)[0] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
