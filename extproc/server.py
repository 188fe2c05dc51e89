"""Process wiring: gRPC server, health, metrics endpoint, endpoint discovery, reloads.

Reloads come from two places, a file watcher (polling, so it works on every filesystem
and in containers with config maps) and SIGHUP; both go through ``reload``, which keeps
the running config when the new file is invalid.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
from pathlib import Path

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest
from envoy.service.endpoint.v3 import eds_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2_grpc
from prometheus_client import start_http_server

from .config import Config, ConfigError, redact
from .core import EndpointDirectory
from .discovery.sources import EndpointSources
from .envoy.eds import METHOD as EDS_METHOD
from .envoy.eds import EdsService, GrpcioEds, registered_view
from .envoy import access_log
from .envoy.completions import Completions
from .envoy.forwarding import Forwarder, WorkerLink
from .envoy.processor import Processor
from .transport import DEFAULT_LIMITS, GrpcServer, H2Limits, ReloadingTls, TlsFiles, grpcio_credentials
from .transport.health import EXT_PROC_SERVICE, Health
from .runtime import Runtime, load_config
from .signals import LoadView, ScraperService
from .state import LocalInflight, StateStores
from .state.shared_inflight import CONNS, METRICS_PORT, PID, SharedInflight
from .telemetry import Telemetry

log = logging.getLogger("ai_lb")

PROCESS_METHOD = f"/{EXT_PROC_SERVICE}/Process"
GRPC_OPTIONS = [
    # Prompts are large: a 200k-token context is ~1 MB of JSON; images more.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_concurrent_streams", 100000),
    ("grpc.so_reuseport", 0),
]


class Gateway:
    """One ai-lb process (or one of ``server.workers``: ``worker`` links it to the others).
    ``start`` then ``wait``; ``reload`` at any time."""

    def __init__(self, config_path: str | os.PathLike, config: Config | None = None,
                 worker: WorkerLink | None = None) -> None:
        self.config_path = Path(config_path)
        self.config = config or load_config(self.config_path)
        self.worker = worker
        self.telemetry = Telemetry(fallback_log_interval=self.config.server.fallback_log_interval)
        # The gateway's shared signals and state, lent to every policy (PolicyEnv).
        inflight = LocalInflight(on_change=self.telemetry.set_inflight) if worker is None else \
            SharedInflight(worker.table, worker.index, on_change=self.telemetry.set_inflight)
        self.load = LoadView(inflight)
        self.stores = StateStores(inflight)
        self.scrapes = ScraperService(on_sample=self.load.on_scrape)
        self.directory = EndpointDirectory()
        self.runtime = Runtime(self.directory, self.load, self.stores, self.scrapes)
        self.runtime.on_learned = self._update_endpoint_gauges
        srv = self.config.server
        self.completions = Completions(srv.completions, srv.completion_lease, worker=worker.index if worker else 0,
                                       nonce=worker.nonce if worker else None)
        self.forwarder = Forwarder(self.completions, worker) if worker else None  # becomes completions.forward
        self.processor = Processor(self.runtime, self.telemetry, self.load, srv.max_body_bytes, self.completions)
        self.access_log = access_log.AccessLogSink(self.completions)
        self.telemetry.completions = lambda: self.completions.stats
        self.telemetry.policy_stats = lambda: [(n, r.policy_name, r.policy.stats)
                                               for n, r in self.runtime.routes.items() if r.policy is not None]
        self.telemetry.state_events = lambda: self.stores.events
        self.telemetry.queues = lambda: [(n, r.gate) for n, r in self.runtime.routes.items() if r.gate is not None]
        self.health = Health()  # liveness, readiness, "" and the ext_proc service, both transports
        self.sources = EndpointSources(self.directory, self._discovery_changed, self.stores, self.telemetry.registry,
                                       on_hold_limit=self.runtime.set_hold_limit)
        self.eds = EdsService(registered_view(self.directory))  # registered instances, served to Envoy
        self._grpc: grpc.aio.Server | None = None
        self._h2: GrpcServer | None = None
        self._health_srv: GrpcServer | None = None
        self._metrics_server = None
        self._tasks: list[asyncio.Task] = []
        self._file_sig = self._file_signature()
        self._stopping = asyncio.Event()
        self.grpc_port = 0
        self._sid_marks: dict = {}   # connection -> its last stream id at the last balancing look
        self.health_port = 0
        self.metrics_port = 0

    async def start(self) -> None:
        await self.scrapes.start()
        await self.runtime.apply(self.config)
        await self.health.set(live=True, ready=False)
        self.sources.start(self.config)
        await self.sources.start_registry(self.config)
        self._update_endpoint_gauges()
        if self.config.server.transport == "grpcio":
            await _start_grpcio(self)
        else:
            await self._start_native()
        if self.config.server.health_listen:
            await self._start_health_listener(self.config.server.health_listen)
        host, _, port = self.config.server.metrics_listen.rpartition(":")
        if self.worker is not None:   # the supervisor serves metrics_listen, from every worker's own port
            host, port = "127.0.0.1", "0"
        self._metrics_server, _ = start_http_server(int(port), addr=host, registry=self.telemetry.registry)
        self.metrics_port = self._metrics_server.server_port
        loop = asyncio.get_running_loop()
        if self.worker is not None:
            self._tasks.append(loop.create_task(_join_workers(self), name="workers"))
        self._tasks.append(loop.create_task(self._watch_file(), name="config-watch"))
        self._tasks.append(loop.create_task(self.completions.run(), name="completion-leases"))
        self._tasks.append(loop.create_task(self._become_ready(), name="readiness"))
        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload("SIGHUP")))
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stopping.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass
        redis_urls = self.stores.redis_urls()  # the global store and the routes' own (serviceFQDN)
        log.info("ai-lb serving ext_proc on %s:%d (%s transport), metrics on %s:%d, %d route(s), store=%s, "
                 "redis in use: %s", self.config.server.listen.rpartition(":")[0], self.grpc_port,
                 self.config.server.transport, host, self.metrics_port, len(self.config.routes),
                 redact(self.config.store), ", ".join(map(redact, redis_urls)) or "none")
        await probe_redis(redis_urls)

    async def wait(self) -> None:
        await self._stopping.wait()
        await self.stop()

    async def stop(self, grace: float = 1.0) -> None:
        """Report NOT_SERVING first so Envoy's health check drains us, then stop."""
        self._stopping.set()
        await self.health.set(live=True, ready=False)
        for t in self._tasks:
            t.cancel()
        await self.sources.stop()
        if self.forwarder is not None:
            self.forwarder.close()
        if self._health_srv:
            await self._health_srv.stop(0)
        if self._grpc:
            await self._grpc.stop(grace)
        if self._h2:
            await self._h2.stop(grace)
        if self._metrics_server:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self.completions.close()  # parked requests end now: their policies' state is released
        await self.runtime.close()
        await self.scrapes.close()
        await self.stores.close()

    async def reload(self, why: str = "file change") -> bool:
        """Apply the config file again; on any problem keep serving the old config."""
        try:
            new = load_config(self.config_path)
            await self.runtime.apply(new)
        except ConfigError as e:
            self.telemetry.reloads.labels("rejected").inc()
            log.error("config reload (%s) rejected, keeping the running config:\n  %s", why, "\n  ".join(e.problems))
            return False
        except Exception as e:  # noqa: BLE001 - a policy failed to start
            self.telemetry.reloads.labels("rejected").inc()
            # The type and a bounded message only: an exception's repr may carry file bytes.
            log.error("config reload (%s) failed, keeping the running config: %s: %.200s",
                      why, type(e).__name__, redact(str(e)))
            return False
        old, self.config = self.config, new
        self.completions.mode, self.completions.lease = new.server.completions, new.server.completion_lease
        for fname in ("listen", "metrics_listen", "max_body_bytes", "transport", "tls", "health_listen", "workers"):
            if getattr(old.server, fname) != getattr(new.server, fname):
                log.warning("server.%s changed; takes effect on restart", fname)
        await self.sources.apply(old, new)
        logging.getLogger("ai_lb").setLevel(new.log_level.upper())
        self._update_endpoint_gauges()
        self.telemetry.reloads.labels("applied").inc()
        log.info("config reloaded (%s): %d route(s): %s", why, len(new.routes),
                 ", ".join(f"{n}={r.lb_policy}{'' if r.enabled else '(disabled)'}" for n, r in new.routes.items()))
        return True

    # -- transports --------------------------------------------------------------------
    async def _start_native(self) -> None:
        # A buffered prompt up to max_body_bytes arrives as one gRPC message, plus framing.
        body = self.config.server.max_body_bytes
        tls = self.config.server.tls
        reloading = None if tls is None else ReloadingTls(TlsFiles(tls.cert, tls.key, tls.client_ca),
                                                          poll_interval=self.config.server.reload_interval)
        srv = GrpcServer(H2Limits(max_message_size=max(DEFAULT_LIMITS.max_message_size, body + (1 << 20))), tls=reloading,
                         reuse_port=self.worker is not None)
        srv.add_method(PROCESS_METHOD, pb.ProcessingRequest.FromString, lambda st: self.processor.Process(None, st))
        srv.add_method(EDS_METHOD, DiscoveryRequest.FromString, self.eds.stream)
        srv.add_method(access_log.METHOD, access_log.decode, self.access_log.serve)
        self.health.serve_on(srv)
        host, _, port = self.config.server.listen.rpartition(":")
        self.grpc_port = await srv.start(host.strip("[]"), int(port))
        self._h2 = srv

    async def _start_health_listener(self, listen: str) -> None:
        """Plaintext gRPC health only (kubelet's gRPC probes speak no TLS)."""
        srv = GrpcServer(reuse_port=self.worker is not None)
        self.health.serve_on(srv)
        host, _, port = listen.rpartition(":")
        self.health_port = await srv.start(host.strip("[]"), int(port))
        self._health_srv = srv

    async def _become_ready(self) -> None:
        """Readiness: SERVING once every configured endpoint source has answered once."""
        while not self._stopping.is_set():
            if self.sources.synced:
                await self.health.set(live=True, ready=True)
                log.info("ready: first endpoint discovery done")
                return
            await asyncio.sleep(0.05)

    # -- internals ---------------------------------------------------------------------
    def _discovery_changed(self) -> None:
        self.runtime.refresh_candidates()
        self._update_endpoint_gauges()
        self.eds.changed()

    def _update_endpoint_gauges(self) -> None:
        g = self.telemetry.endpoints
        for name, r in self.runtime.routes.items():
            eps = r.known(self.directory)
            healthy = sum(e.healthy for e in eps)
            g.labels(name, "healthy").set(healthy)
            g.labels(name, "unhealthy").set(len(eps) - healthy)

    def _file_signature(self) -> str | None:
        try:
            return hashlib.sha256(self.config_path.read_bytes()).hexdigest()
        except OSError:
            return None

    async def _watch_file(self) -> None:
        while True:
            await asyncio.sleep(self.config.server.reload_interval)
            sig = self._file_signature()
            if sig is not None and sig != self._file_sig:
                self._file_sig = sig
                await self.reload("file change")


async def _start_grpcio(self: Gateway) -> None:
    """``server.transport: grpcio``."""
    s = grpc.aio.server(options=[*GRPC_OPTIONS[:-1], ("grpc.so_reuseport", int(self.worker is not None))])
    pb_grpc.add_ExternalProcessorServicer_to_server(self.processor, s)
    self.processor.raw_answers = False  # grpcio serializes messages itself
    access_log.add_to_grpcio(s, self.access_log)
    eds_pb2_grpc.add_EndpointDiscoveryServiceServicer_to_server(GrpcioEds(self.eds), s)
    health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, s)
    tls = self.config.server.tls
    if tls is None:
        self.grpc_port = s.add_insecure_port(self.config.server.listen)
    else:
        creds = grpcio_credentials(TlsFiles(tls.cert, tls.key, tls.client_ca), self.config.server.reload_interval)
        self.grpc_port = s.add_secure_port(self.config.server.listen, creds)
    if self.grpc_port == 0:
        raise OSError(f"cannot listen on {self.config.server.listen}")
    await s.start()
    self._grpc = s


async def _join_workers(gw: Gateway, sync_interval: float = 0.02, balance_interval: float = 0.5) -> None:
    """A worker's part in the set: its metrics port for the supervisor, forwarded
    completions in, the other workers' in-flight changes into the load view, and its
    share of Envoy's connections."""
    w = gw.worker
    assert w is not None and gw.forwarder is not None
    w.table.set_header(w.index, METRICS_PORT, gw.metrics_port)
    w.table.set_header(w.index, PID, os.getpid())
    gw.forwarder.start()
    loop = asyncio.get_running_loop()
    next_balance = loop.time() + balance_interval
    while True:
        await asyncio.sleep(sync_interval)
        gw.load.sync()
        if loop.time() >= next_balance:
            _even_out(gw)
            next_balance = loop.time() + balance_interval


def _even_out(gw: Gateway, busy_at: int = 10) -> bool:
    """The kernel deals connections to workers by a hash (SO_REUSEPORT), and Envoy keeps
    one per worker thread: two can land on one worker while another idles. Connections
    that carried at least ``busy_at`` calls since the last look count (not Envoy's health
    checker's); a worker with at least two more than the least loaded one asks Envoy
    (GOAWAY, graceful: running calls finish) to move one; Envoy reconnects, and the kernel
    deals again. Returns whether it asked."""
    w, srv = gw.worker, gw._h2
    if w is None or srv is None:
        return False
    marks, new = gw._sid_marks, {}
    busy = []
    for c in srv.connections:
        if c.conn.goaway_sent:
            continue
        new[c] = sid = c.conn.last_sid
        if (sid - marks.get(c, 0)) // 2 >= busy_at:
            busy.append(c)
    gw._sid_marks = new
    w.table.set_header(w.index, CONNS, len(busy))
    counts = [w.table.header(i, CONNS) for i in range(w.count) if w.table.header(i, PID)]
    if len(counts) < 2 or len(busy) < max(counts) or max(counts) - min(counts) < 2:
        return False
    victim = min(busy, key=lambda c: new[c] - marks.get(c, 0))
    log.info("worker %d: %d of %d busy connections; asking Envoy to move one", w.index, len(busy), sum(counts))
    victim.shutdown()
    return True


async def probe_redis(urls: list[str]) -> None:
    """Warn at start-up about every Redis store that does not answer (unresolvable host,
    refused connection, failed AUTH): the Redis policies then decide with local state,
    which is not what the operator configured."""
    from .state.resp import RespClient  # noqa: PLC0415

    async def probe(url: str) -> None:
        client = RespClient.from_url(url, connect_timeout=1.0)
        try:
            async with asyncio.timeout(1.5):
                await client.ping()
        except Exception as e:  # noqa: BLE001 - every failure is worth the same warning
            log.warning("redis %s does not answer at start-up (%s: %s); the Redis-backed policies use "
                        "local state until it does", redact(url), type(e).__name__, redact(str(e)) or "timeout")
        finally:
            await client.aclose()

    await asyncio.gather(*(probe(u) for u in urls))


async def serve(config_path: str | os.PathLike, config: Config | None = None, worker: WorkerLink | None = None) -> None:
    gw = Gateway(config_path, config, worker)
    await gw.start()
    await gw.wait()


def run(config_path: str | os.PathLike, config: Config | None = None, worker: WorkerLink | None = None) -> None:
    """Run until SIGTERM/SIGINT, on uvloop when it is installed (a faster event loop)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config_path, config, worker))
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        r.run(serve(config_path, config, worker))
