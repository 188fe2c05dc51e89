"""CPU per ext_proc stream of the gRPC transports, driven by a real Envoy, in one run.

Each option serves the same trivial handler (read one ProcessingRequest with
request_headers, write one ProcessingResponse, read EOF, end OK) in its own process:

    a  extproc/h2grpc.py as it was before the transport package (hand-written HTTP/2), from
       ``git show d83ffdf:extproc/h2grpc.py`` (so this needs the source checkout)
    b  a small asyncio gRPC layer over python-hyper's ``h2`` (sans-IO), defined below
    c  grpcio's aio server
    d  extproc/transport (the current package), when it is importable
    e  (b) with h2's header validation and normalisation off: a lower bound for any h2 layer

One Envoy (``--concurrency 1``) has a listener per option whose ext_proc filter points at
that option's server and whose route answers with ``direct_response``. ``wrk`` drives each
listener for a few seconds; the server's CPU (utime+stime from /proc/<pid>/stat, all its
threads) over the run, divided by the requests wrk completed, is the CPU per stream.
Runs alternate between options, in a rotating order, so machine noise hits all of them;
the table shows medians. Everything binds to 127.0.0.1 and every run is bounded in time.

    pip install h2                             # for options b and e
    python -m aibench.transport                # 5 rounds x 4 s per option and concurrency (~5 min)
    python -m aibench.transport --rounds 3 --seconds 3 --options a,b,c --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
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

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "d83ffdf"  # the last commit with the hand-written server in one module
sys.path.insert(0, str(ROOT))

PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
LABELS = {"a": "hand-written h2grpc (main)", "b": "asyncio + python-hyper h2", "c": "grpcio aio server",
          "d": "extproc.transport (the current package)", "e": "h2, header validation off (lower bound)"}
TICK = os.sysconf("SC_CLK_TCK")


# -- the servers (run in child processes: ``--serve KIND``) -------------------------------
def _pb():
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    return pb


async def trivial(stream, eof) -> None:
    """The handler every option serves; ``stream`` has grpcio's read()/write() API."""
    req = await stream.read()
    if req is eof:
        return
    await stream.write(RESP)
    while (await stream.read()) is not eof:
        pass


RESP = None


def _load_main_h2grpc():
    """extproc/h2grpc.py before the transport package (the baseline), imported from its source."""
    import importlib.util

    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{BASELINE}:extproc/h2grpc.py"], capture_output=True,
                         text=True, check=True).stdout
    path = Path(tempfile.mkdtemp(prefix="h2grpc-main-")) / "h2grpc_main.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("h2grpc_main", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class H2Layer:
    """Option (b): gRPC over python-hyper's ``h2`` state machine, on an asyncio Protocol.

    h2 does the framing, HPACK, stream states, flow-control accounting and validation
    (frame sizes, header list size, concurrent streams); this class only maps its events
    to gRPC calls: one task per stream, messages split out of DATA, window given back as
    messages are taken off, status in trailers.
    """

    def __init__(self, methods: dict, eof, validate: bool = True) -> None:
        self.methods = methods
        self.eof = eof
        self.validate = validate

    def protocol(self):
        import h2.config
        import h2.connection
        import h2.events
        import h2.settings

        layer = self
        v = self.validate
        cfg = h2.config.H2Configuration(client_side=False, header_encoding=None, validate_outbound_headers=v,
                                        normalize_outbound_headers=v, validate_inbound_headers=v,
                                        normalize_inbound_headers=v)
        ev = h2.events

        class Stream:
            __slots__ = ("sid", "buf", "msgs", "waiter", "ended", "task", "proto", "decode", "headers_sent")

            def __init__(self, proto, sid, decode):
                self.proto, self.sid, self.decode = proto, sid, decode
                self.buf = bytearray()
                self.msgs = []
                self.waiter = None
                self.ended = False
                self.task = None
                self.headers_sent = False

            async def read(self):
                while True:
                    if self.msgs:
                        return self.msgs.pop(0)
                    if self.ended:
                        return layer.eof
                    self.waiter = asyncio.get_running_loop().create_future()
                    try:
                        await self.waiter
                    finally:
                        self.waiter = None

            async def write(self, msg):
                raw = msg.SerializeToString()
                c = self.proto.conn
                if not self.headers_sent:
                    self.headers_sent = True
                    c.send_headers(self.sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
                c.send_data(self.sid, b"\x00" + len(raw).to_bytes(4, "big") + raw)
                self.proto.flush()

            def wake(self):
                if self.waiter is not None and not self.waiter.done():
                    self.waiter.set_result(None)

        class Proto(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport
                self.conn = h2.connection.H2Connection(config=cfg)
                self.conn.local_settings = h2.settings.Settings(client=False, initial_values={
                    h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000,
                    h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 64 << 10,
                    h2.settings.SettingCodes.MAX_FRAME_SIZE: 1 << 20,
                    h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 4 << 20})
                self.conn.initiate_connection()
                self.conn.increment_flow_control_window(16 << 20)
                self.streams = {}
                self.flush()

            def flush(self):
                data = self.conn.data_to_send()
                if data:
                    self.transport.write(data)

            def data_received(self, data):
                try:
                    events = self.conn.receive_data(data)
                except Exception:  # noqa: BLE001 - h2 queued the GOAWAY
                    self.flush()
                    self.transport.close()
                    return
                for e in events:
                    t = type(e)
                    if t is ev.RequestReceived:
                        path = dict(e.headers).get(b":path", b"").decode()
                        m = layer.methods.get(path)
                        if m is None:
                            self.conn.send_headers(e.stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                                                 (b"grpc-status", b"12")], end_stream=True)
                            continue
                        s = Stream(self, e.stream_id, m[0])
                        self.streams[e.stream_id] = s
                        s.task = asyncio.get_running_loop().create_task(self.run(s, m[1]))
                    elif t is ev.DataReceived:
                        s = self.streams.get(e.stream_id)
                        if s is None:
                            continue
                        s.buf += e.data
                        while len(s.buf) >= 5:
                            n = int.from_bytes(s.buf[1:5], "big")
                            if len(s.buf) < 5 + n:
                                break
                            s.msgs.append(s.decode(bytes(s.buf[5:5 + n])))
                            del s.buf[:5 + n]
                        if e.flow_controlled_length:
                            self.conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                        s.wake()
                    elif t is ev.StreamEnded:
                        s = self.streams.get(e.stream_id)
                        if s is not None:
                            s.ended = True
                            s.wake()
                    elif t is ev.StreamReset:
                        s = self.streams.pop(e.stream_id, None)
                        if s is not None and s.task is not None:
                            s.task.cancel()
                self.flush()

            async def run(self, s, handler):
                try:
                    await handler(s)
                except asyncio.CancelledError:
                    return
                if self.streams.pop(s.sid, None) is None:
                    return
                hdrs = [(b"grpc-status", b"0")]
                if not s.headers_sent:
                    hdrs = [(b":status", b"200"), (b"content-type", b"application/grpc")] + hdrs
                try:
                    self.conn.send_headers(s.sid, hdrs, end_stream=True)
                except Exception:  # noqa: BLE001 - stream already closed by the peer
                    return
                self.flush()

            def connection_lost(self, exc):
                for s in self.streams.values():
                    if s.task is not None:
                        s.task.cancel()

        return Proto


async def serve(kind: str, port_file: str) -> None:
    global RESP
    pb = _pb()
    RESP = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
    import grpc

    eof = grpc.aio.EOF
    handler = lambda st: trivial(st, eof)  # noqa: E731
    loop = asyncio.get_running_loop()
    if kind == "a":
        mod = _load_main_h2grpc()
        srv = mod.GrpcServer()
        srv.add_method(PROCESS, pb.ProcessingRequest.FromString, handler)
        port = await srv.start("127.0.0.1", 0)
    elif kind == "d":
        from extproc.transport import GrpcServer

        srv = GrpcServer()
        srv.add_method(PROCESS, pb.ProcessingRequest.FromString, handler)
        port = await srv.start("127.0.0.1", 0)
    elif kind in ("b", "e"):
        proto = H2Layer({PROCESS: (pb.ProcessingRequest.FromString, handler)}, eof, validate=kind == "b").protocol()
        srv = await loop.create_server(proto, "127.0.0.1", 0, backlog=1024)
        port = srv.sockets[0].getsockname()[1]
    elif kind == "c":
        from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

        class Servicer(pb_grpc.ExternalProcessorServicer):
            async def Process(self, request_iterator, context):  # noqa: N802
                await trivial(context, eof)

        srv = grpc.aio.server(options=[("grpc.max_concurrent_streams", 100000), ("grpc.so_reuseport", 0)])
        pb_grpc.add_ExternalProcessorServicer_to_server(Servicer(), srv)
        port = srv.add_insecure_port("127.0.0.1:0")
        await srv.start()
    else:
        raise SystemExit(f"unknown option {kind}")
    Path(port_file).write_text(str(port))
    await asyncio.sleep(3600)  # the parent kills us; bounded anyway


def run_server(kind: str, port_file: str) -> None:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        r.run(asyncio.wait_for(serve(kind, port_file), 3600))


# -- the driver ---------------------------------------------------------------------------
def envoy_config(admin: int, listeners: dict[str, tuple[int, int]]) -> dict:
    ls, cs = [], []
    for kind, (lport, sport) in listeners.items():
        ls.append({
            "name": f"l{kind}", "address": {"socket_address": {"address": "127.0.0.1", "port_value": lport}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": f"l{kind}",
                "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [{
                    "match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]}]},
                "http_filters": [
                    {"name": "envoy.filters.http.ext_proc", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                        "grpc_service": {"envoy_grpc": {"cluster_name": f"x{kind}"}},
                        "failure_mode_allow": False, "message_timeout": "2s",
                        "processing_mode": {"request_header_mode": "SEND", "response_header_mode": "SKIP",
                                            "request_body_mode": "NONE", "response_body_mode": "NONE",
                                            "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"}}},
                    {"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]})
        cs.append({
            "name": f"x{kind}", "connect_timeout": "1s", "type": "STATIC",
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": f"x{kind}", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": sport}}}}]}]}})
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {"listeners": ls, "clusters": cs}}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


def run_wrk(url: str, conc: int, seconds: int) -> tuple[int, int]:
    out = subprocess.run(["wrk", "-t1", f"-c{conc}", f"-d{seconds}s", url], capture_output=True, text=True,
                         timeout=seconds + 30).stdout
    n = int(re.search(r"(\d+) requests in", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return n, int(bad.group(1)) if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--port-file", help=argparse.SUPPRESS)
    ap.add_argument("--options", default=None, help="comma-separated subset of a,b,c,d,e (default: all available)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=4)
    ap.add_argument("--concurrency", default="1,16",
                    help="comma-separated wrk connection counts (= concurrent ext_proc streams)")
    a = ap.parse_args()
    if a.serve:
        run_server(a.serve, a.port_file)
        return 0
    if not shutil.which("wrk"):
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    from . import devstack as ds

    concs = [int(x) for x in a.concurrency.split(",")]
    kinds = a.options.split(",") if a.options else ["a", "b", "c", "d", "e"]
    if "d" in kinds and not (ROOT / "extproc" / "transport" / "__init__.py").exists():
        kinds.remove("d")
    try:
        import h2  # noqa: F401 - options b and e only; not a dependency of ai-lb
    except ImportError:
        print("# python-hyper h2 not installed (pip install h2): skipping options b and e", flush=True)
        kinds = [k for k in kinds if k not in "be"]
    tmp = Path(tempfile.mkdtemp(prefix="ai-lb-transport-"))
    procs: dict[str, ds.Proc] = {}
    envoy = None
    try:
        ports = {}
        for k in kinds:
            pf = tmp / f"port-{k}"
            procs[k] = ds.spawn(f"server-{k}", [ds.PY, __file__, "--serve", k, "--port-file", str(pf)], tmp)
            deadline = time.monotonic() + 20
            while not pf.exists() or not pf.read_text():
                if time.monotonic() > deadline or not procs[k].alive():
                    raise RuntimeError(f"server {k} did not start:\n{procs[k].log_tail()}")
                time.sleep(0.05)
            ports[k] = int(pf.read_text())
        admin, *lports = ds.free_ports(1 + len(kinds))
        listeners = {k: (lp, ports[k]) for k, lp in zip(kinds, lports)}
        (tmp / "envoy.yaml").write_text(yaml.safe_dump(envoy_config(admin, listeners)))
        envoy = ds.spawn("envoy", [ds.envoy_binary(), "-c", str(tmp / "envoy.yaml"), "--concurrency", "1",
                                   "--use-dynamic-base-id", "--log-level", "warn"], tmp)
        for lp in lports:
            ds.wait_port(lp, proc=envoy)
        for k in kinds:  # warm-up: connections, caches, allocator
            run_wrk(f"http://127.0.0.1:{listeners[k][0]}/", max(concs), 1)
        print(f"# CPU per ext_proc stream: {a.rounds} rounds x {a.seconds}s per option and concurrency, "
              f"Envoy --concurrency 1, {os.cpu_count()} CPUs", flush=True)
        res: dict[tuple[int, str], list[tuple[float, float, int]]] = {(c, k): [] for c in concs for k in kinds}
        for r in range(a.rounds):
            for c in concs:
                order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
                for k in order:
                    pid = procs[k].p.pid
                    c0 = cpu_seconds(pid)
                    n, bad = run_wrk(f"http://127.0.0.1:{listeners[k][0]}/", c, a.seconds)
                    c1 = cpu_seconds(pid)
                    us = (c1 - c0) / max(n, 1) * 1e6
                    res[(c, k)].append((us, n / a.seconds, bad))
                    print(f"round {r + 1} c={c:<3} {k}: {us:7.1f} us/stream  {n / a.seconds:7.0f} rps  non-2xx {bad}",
                          flush=True)
        print()
        print("| option | wrk connections | CPU per stream (median) | min .. max | rps (median) | non-2xx |")
        print("|---|---|---|---|---|---|")
        med = {key: statistics.median(x[0] for x in v) for key, v in res.items()}
        for (c, k), v in res.items():
            us = [x[0] for x in v]
            print(f"| ({k}) {LABELS[k]} | {c} | {med[(c, k)]:.1f} µs | {min(us):.1f} .. {max(us):.1f} µs "
                  f"| {statistics.median(x[1] for x in v):.0f} | {sum(x[2] for x in v)} |")
        print()
        for c in concs:
            if "a" in kinds:
                print(f"c={c}, relative to (a): " + ", ".join(
                    f"({k}) {med[(c, k)] / med[(c, 'a')]:.2f}x" for k in kinds if k != "a"))
            if "d" in kinds:
                print(f"c={c}, relative to (d): " + ", ".join(
                    f"({k}) {med[(c, k)] / med[(c, 'd')]:.2f}x" for k in kinds if k != "d"))
        return 0
    finally:
        if envoy is not None:
            envoy.stop()
        for p in procs.values():
            p.stop()


if __name__ == "__main__":
    sys.exit(main())
