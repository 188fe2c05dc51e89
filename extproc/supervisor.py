"""``server.workers: N``: N ai-lb processes on one port, one supervisor.

The supervisor maps the shared in-flight table (``state.shared_inflight``) and the
completion sockets (``envoy.forwarding``), then forks the workers: each is a whole
gateway (``server.Gateway``) bound to ``server.listen`` with ``SO_REUSEPORT``, so the
kernel spreads Envoy's connections over them. The supervisor itself serves no request:

* **metrics**: it serves ``server.metrics_listen``; a scrape reads every worker's own
  metrics (each on a loopback port it publishes in the table) and labels every sample
  with ``worker``. Counters stay per worker: ``sum without (worker)`` adds them up.
* **signals**: SIGTERM/SIGINT are passed on (each worker drains as a single process
  does), then it waits for them; SIGHUP is passed on (each worker also watches the file).
* **crashes**: a worker that dies is replaced (after 1 s, doubling while it keeps dying
  within 10 s of starting, up to 30 s); its row of the table is cleared first, since its
  requests died with it.

One process stays single-threaded (forks happen only from it), and nothing here is on
the request path.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from .config import Config
from .envoy.forwarding import WorkerLink, socket_pairs
from .state.shared_inflight import METRICS_PORT, SharedTable

log = logging.getLogger("ai_lb.supervisor")


class Supervisor:
    def __init__(self, config_path: str | os.PathLike, config: Config) -> None:
        self.config_path = Path(config_path)
        self.config = config
        self.n = config.server.workers
        self.table = SharedTable(self.n)
        self.inboxes, self.outboxes = socket_pairs(self.n)
        self.nonce = os.urandom(4).hex()
        self.pids: dict[int, int] = {}          # pid -> worker index
        self.started: dict[int, float] = {}     # worker index -> when its process started
        self.backoff: dict[int, float] = {}
        self.due: dict[int, float] = {}         # worker index -> when to start it again
        self.stopping = False
        self._hup = False

    # -- workers -------------------------------------------------------------------------
    def spawn(self, i: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                from .server import run  # noqa: PLC0415

                run(self.config_path, None, WorkerLink(i, self.n, self.table, self.inboxes, self.outboxes, self.nonce))
            except BaseException:  # noqa: BLE001 - a worker's end is reported by its exit status
                log.exception("worker %d failed", i)
                code = 1
            finally:
                os._exit(code)
        self.pids[pid] = i
        self.started[i] = time.monotonic()
        log.info("worker %d started (pid %d)", i, pid)

    def reap(self) -> None:
        while self.pids:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            i = self.pids.pop(pid, None)
            if i is None or self.stopping:
                continue
            quick = time.monotonic() - self.started.get(i, 0.0) < 10.0
            delay = min(30.0, self.backoff.get(i, 0.5) * 2) if quick else 1.0
            self.backoff[i] = delay
            self.table.clear_row(i)
            self.due[i] = time.monotonic() + delay
            log.error("worker %d (pid %d) exited with status %d; restarting it in %.0f s", i, pid, status, delay)

    def signal_all(self, sig: int) -> None:
        for pid in list(self.pids):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    # -- the supervisor's loop -----------------------------------------------------------
    def run(self) -> int:
        def on_stop(signum, frame):
            self.stopping = True

        def on_hup(signum, frame):
            self._hup = True

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        for i in range(self.n):
            self.spawn(i)
        host, _, port = self.config.server.metrics_listen.rpartition(":")
        metrics = HTTPServer((host.strip("[]"), int(port)), _metrics_handler(self))
        metrics.timeout = 0.2
        log.info("ai-lb supervisor: %d workers on %s, metrics on %s:%d", self.n, self.config.server.listen,
                 host, metrics.server_port)
        try:
            while not self.stopping:
                metrics.handle_request()   # at most 0.2 s: the loop checks the rest in between
                self.reap()
                if self._hup:
                    self._hup = False
                    self.signal_all(signal.SIGHUP)
                now = time.monotonic()
                for i, t in list(self.due.items()):
                    if now >= t and not self.stopping:
                        del self.due[i]
                        self.spawn(i)
        finally:
            metrics.server_close()
            self.stop()
        return 0

    def stop(self, grace: float = 10.0) -> None:
        self.stopping = True
        self.signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.pids and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.05)
        self.signal_all(signal.SIGKILL)
        while self.pids:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.pids.pop(pid, None)

    def worker_ports(self) -> list[tuple[int, int]]:
        return [(i, self.table.header(i, METRICS_PORT)) for i in range(self.n)
                if i in self.pids.values() and self.table.header(i, METRICS_PORT)]


def _metrics_handler(sup: Supervisor):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            body = merged_metrics(sup.worker_ports()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    return Handler


def merged_metrics(ports: list[tuple[int, int]], timeout: float = 1.0) -> str:
    """Every worker's metrics, each sample labelled ``worker``, one family at a time."""
    import urllib.request  # noqa: PLC0415

    from prometheus_client.exposition import generate_latest  # noqa: PLC0415
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415
    from prometheus_client.samples import Sample  # noqa: PLC0415

    families: dict[str, object] = {}
    for i, port in ports:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
                text = r.read().decode()
        except OSError as e:
            log.warning("metrics of worker %d unavailable: %s", i, e)
            continue
        for fam in text_string_to_metric_families(text):
            into = families.get(fam.name)
            if into is None:
                into = families[fam.name] = type(fam)(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                into.samples.append(Sample(s.name, {**s.labels, "worker": str(i)}, s.value, s.timestamp, s.exemplar))

    class _Merged:
        def collect(self):
            return list(families.values())

    return generate_latest(_Merged()).decode()  # type: ignore[arg-type]


def run(config_path: str | os.PathLike, config: Config) -> None:
    raise SystemExit(Supervisor(config_path, config).run())
