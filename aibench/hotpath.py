"""ai-lb's Python CPU per routed request, measured on Envoy's own bytes replayed in-process.

The live CPU per request (``aibench.overhead``, from ``/proc``) moves by several percent
between runs on a shared machine, which hides the few-percent gains of hot-path work. So:

* ``record``: a real Envoy 1.40 in front of instant backends, ai-lb behind it, load from
  ``wrk`` (flat out at 32 connections, then one at a time; a Python client when wrk is
  missing). ai-lb runs with a recorder that keeps every read from Envoy's connections, in
  order and as the kernel delivered them (so the batching of a loaded run is kept).
* ``replay``: a fresh in-process ai-lb (the real transport, processor, policy and
  access-log sink; a socket that only counts what is written) is fed those reads. The
  recorded completion ids are ai-lb's own, so the access log's entries end the requests
  the replay routed. CPU per routed request = process time / requests; the minimum over a
  few replays (replays of one tree spread ~3-5 %). ``--ai-lb-source`` replays with another
  tree (the 'before'), in a subprocess, alternating with this one.

    python -m aibench.hotpath                                  # record (temporary), replay
    python -m aibench.hotpath record /tmp/rr.rec --policy round_robin
    python -m aibench.hotpath replay /tmp/rr.rec [--ai-lb-source DIR] [--profile]

What it leaves out: syscalls, the event loop's own C work, and cold caches after idle
gaps (those are in ``aibench.overhead``'s numbers, not here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import yaml

from . import devstack as ds
from .overhead_wrk import LUA, chat_body, start_instant_backends

MAGIC = b"ai-lb-hotpath/1\n"
_REC = struct.Struct(">II")  # connection number, length

# Run inside the recorded ai-lb: keep every read of every connection, write them at exit.
_RECORDER = """
import atexit, itertools, sys
out = sys.argv.pop(1)
import extproc.transport.server as S
import extproc.envoy.completions as C
reads, conns, meta = [], {}, {}
number = itertools.count()
received = S.H2Protocol.data_received
def data_received(self, data):
    n = conns.get(id(self))
    if n is None:
        n = conns[id(self)] = next(number)
    reads.append((n, bytes(data)))
    return received(self, data)
S.H2Protocol.data_received = data_received
init = C.Completions.__init__
def completions_init(self, *a, **k):
    init(self, *a, **k)
    meta.update(prefix=self.prefix, nonce=self.nonce)
C.Completions.__init__ = completions_init
def dump():
    from aibench.hotpath import write_recording
    write_recording(out, meta, reads)
atexit.register(dump)
sys.argv[0] = "ai-lb"
from extproc.cli import main
sys.exit(main())
"""


def record(out: Path, policy: str = "round_robin", seconds: float = 4.0, wrk: bool | None = None) -> int:
    """Record Envoy's traffic to ai-lb under load; returns the HTTP requests sent. ``wrk``:
    load from wrk (None: if it is installed) or from Python clients."""
    tmp = Path(tempfile.mkdtemp(prefix="ai-lb-hotpath-"))
    procs: list[ds.Proc] = []
    try:
        bports = ds.free_ports(4)
        badmin, listen, admin, grpc, metrics = ds.free_ports(5)
        procs.append(start_instant_backends(tmp, badmin, bports))
        procs.append(ds.start_envoy(tmp, ds.EnvoyPorts(listen, admin, grpc), bports, message_timeout=2.0))
        ds.wait_cluster_healthy(admin, "llm_backends", len(bports))
        cfg = tmp / "ai-lb.yaml"
        ds.write_ai_lb_config(cfg, grpc, metrics, {"llm": {"lb_policy": policy, "endpoints": {"cluster": "llm_backends"}}},
                              envoy_admin_port=admin, log_level="warning", server={"fallback_log_interval": 10.0})
        ai = ds.spawn("ai-lb", [ds.PY, "-c", _RECORDER, str(out.resolve()), "serve", "-c", str(cfg)], tmp)
        procs.append(ai)
        ds.wait_port(grpc, proc=ai)
        time.sleep(1.0)
        url = f"http://127.0.0.1:{listen}/v1/chat/completions"
        body = tmp / "body.json"
        body.write_bytes(chat_body(1024))
        use_wrk = shutil.which("wrk") is not None if wrk is None else wrk
        sent = _load(url, body, tmp, 32, seconds, use_wrk) + _load(url, body, tmp, 1, seconds / 2, use_wrk)
        ai.stop()  # SIGTERM: ai-lb stops cleanly and the recorder writes its file
        if not out.is_file():
            raise RuntimeError(f"ai-lb wrote no recording:\n{ai.log_tail()}")
        meta, reads = load_recording(out)
        meta.update(policy=policy, endpoints=[f"127.0.0.1:{p}" for p in bports])  # what the replay routes to
        write_recording(out, meta, reads)
        return sent
    finally:
        for p in reversed(procs):
            p.stop()


def _load(url: str, body: Path, tmp: Path, conc: int, seconds: float, wrk: bool) -> int:
    """Closed-loop load for ``seconds``: wrk, or ``conc`` Python clients (at most 8)."""
    if wrk:
        (tmp / "post.lua").write_text(LUA)
        r = subprocess.run(["wrk", "-t1", f"-c{conc}", f"-d{max(1, round(seconds))}s", "-s", str(tmp / "post.lua"), url],
                           capture_output=True, text=True, timeout=seconds + 30, env=dict(os.environ, BODY_FILE=str(body)))
        return int(r.stdout.split(" requests in")[0].split()[-1])
    data, deadline, counts = body.read_bytes(), time.monotonic() + seconds, []

    def client() -> None:
        n = 0
        while time.monotonic() < deadline:
            req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=5) as r:
                r.read()
            n += 1
        counts.append(n)

    threads = [threading.Thread(target=client) for _ in range(min(conc, 8))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    return sum(counts)


def write_recording(path: Path | str, meta: dict, reads: list[tuple[int, bytes]]) -> None:
    """The file: MAGIC, a JSON header line, then (connection, length, bytes) per read."""
    with open(path, "wb") as f:
        f.write(MAGIC + json.dumps(meta).encode() + b"\n")
        f.writelines(_REC.pack(n, len(b)) + b for n, b in reads)


def load_recording(path: Path) -> tuple[dict, list[tuple[int, bytes]]]:
    raw = path.read_bytes()
    if not raw.startswith(MAGIC):
        raise ValueError(f"{path} is not a hotpath recording")
    head_end = raw.index(b"\n", len(MAGIC))
    meta = json.loads(raw[len(MAGIC):head_end])
    reads, pos = [], head_end + 1
    while pos < len(raw):
        n, length = _REC.unpack_from(raw, pos)
        pos += _REC.size
        reads.append((n, raw[pos:pos + length]))
        pos += length
    return meta, reads


class _Socket:
    """The transport side of a replayed connection: writes go nowhere."""

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default=None):
        return default


async def _replay_once(meta: dict, reads: list[tuple[int, bytes]], tmp: Path) -> tuple[float, int, dict]:
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from extproc.envoy import access_log
    from extproc.server import PROCESS_METHOD, Gateway
    from extproc.transport import GrpcServer
    from extproc.transport.server import H2Protocol

    cfg = tmp / "replay.yaml"
    cfg.write_text(yaml.safe_dump({"server": {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"},
                                   "routes": {"llm": {"lb_policy": meta["policy"],
                                                      "endpoints": {"static": meta["endpoints"]}}},
                                   "log_level": "warning"}))
    gw = Gateway(cfg)
    await gw.runtime.apply(gw.config)
    gw.completions.prefix, gw.completions.nonce = meta["prefix"], meta["nonce"]  # the recorded ids are ours
    srv = GrpcServer()
    srv.add_method(PROCESS_METHOD, pb.ProcessingRequest.FromString, lambda st: gw.processor.Process(None, st))
    srv.add_method(access_log.METHOD, access_log.decode, gw.access_log.serve)
    gw.health.serve_on(srv)
    conns: dict[int, H2Protocol] = {}
    sleep = asyncio.sleep
    t0 = time.process_time()
    for n, data in reads:
        p = conns.get(n)
        if p is None:
            p = conns[n] = H2Protocol(srv)
            p.connection_made(_Socket())
        p.data_received(data)
        await sleep(0)  # the calls this read started or woke run, as in the live loop
        await sleep(0)
    cpu = time.process_time() - t0
    st = dict(gw.completions.stats)
    routed = st["access_log"] + st["stream"] + len(gw.completions)
    for p in conns.values():
        p.connection_lost(None)
    served = gw.telemetry.served  # replayed picks that the recorded log contradicts (older trees: a Counter)
    st["served_elsewhere"] = served.get(("llm", "fallback"), 0) if isinstance(served, dict) else None
    return cpu, routed, st


def replay(path: Path, reps: int = 5) -> dict:
    """CPU per routed request of this interpreter's ai-lb over the recording."""
    import uvloop

    meta, reads = load_recording(path)
    tmp = Path(tempfile.mkdtemp(prefix="ai-lb-hotpath-"))
    runs: list[float] = []
    for _ in range(reps):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
            cpu, routed, st = r.run(_replay_once(meta, reads, tmp))
        runs.append(cpu / max(routed, 1) * 1e6)
    return {"us_per_request": min(runs), "runs": runs, "routed": routed, "reads": len(reads), "completions": st}


def profile(path: Path, top: int = 30) -> None:
    """One replay under cProfile: the functions with the most time of their own."""
    import cProfile
    import pstats

    import uvloop

    meta, reads = load_recording(path)
    tmp = Path(tempfile.mkdtemp(prefix="ai-lb-hotpath-"))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        prof = cProfile.Profile()
        prof.enable()
        r.run(_replay_once(meta, reads, tmp))
        prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


# This bench's code, the other tree's product: import the bench, forget the product it
# brought, then put the other tree first (the product is imported lazily by the replay).
_REPLAY_FROM = """
import json, sys
from pathlib import Path
src, here = sys.argv.pop(1), sys.argv.pop(1)
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, here)
import aibench.hotpath as hotpath
for m in [m for m in sys.modules if m == "extproc" or m.startswith("extproc.")]:
    del sys.modules[m]
sys.path.remove(here)
sys.path.insert(0, src)
print(json.dumps(hotpath.replay(Path(sys.argv[1]), int(sys.argv[2]))))
"""


def replay_in(src: Path, path: Path, reps: int) -> dict:
    """Replay with the ai-lb of another source tree (this bench's code, that tree's product)."""
    here = str(Path(__file__).resolve().parents[1])
    r = subprocess.run([ds.PY, "-c", _REPLAY_FROM, str(src.resolve()), here, str(path), str(reps)],
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", nargs="?", choices=("record", "replay"))
    ap.add_argument("file", nargs="?", type=Path)
    ap.add_argument("--policy", default="round_robin")
    ap.add_argument("--seconds", type=float, default=4.0, help="recording: seconds of flat-out load (then half at c=1)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ai-lb-source", type=Path, action="append", default=[], help="also replay with this tree")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one more replay (this tree)")
    a = ap.parse_args()
    path = a.file or Path(tempfile.mkdtemp(prefix="ai-lb-hotpath-")) / "envoy.rec"
    if a.command in (None, "record"):
        sent = record(path, a.policy, a.seconds)
        _, reads = load_recording(path)
        print(f"recorded {len(reads):,} reads from Envoy ({sent:,} HTTP requests, {a.policy}) in {path}", flush=True)
        if a.command == "record":
            return 0
    # Alternate the trees, one replay each per round, so machine noise hits them alike.
    trees: dict[str, list[dict]] = {"this tree": [], **{str(src): [] for src in a.ai_lb_source}}
    for _ in range(a.reps):
        trees["this tree"].append(replay(path, 1))
        for src in a.ai_lb_source:
            trees[str(src)].append(replay_in(src, path, 1))
    if a.profile:
        profile(path)
    best = {}
    for name, rs in trees.items():
        runs = [x["us_per_request"] for x in rs]
        best[name] = min(runs)
        print(f"{name}: {best[name]:.1f} µs of Python CPU per routed request (min of {len(runs)}: "
              f"{', '.join(f'{x:.1f}' for x in runs)}; {rs[-1]['routed']:,} routed, "
              f"{rs[-1]['completions']['access_log']:,} ended by the access log)", flush=True)
    for src in a.ai_lb_source:
        print(f"this tree / {src} = {best['this tree'] / best[str(src)]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
