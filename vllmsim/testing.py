"""Helpers for synchronous code (pytest without asyncio, demos) to run a cluster.

* ``run_cluster_subprocess(...)``: ``python -m vllmsim serve`` in a child process (own
  CPU core and GIL: use it when the load generator lives in the test process);
* ``run_cluster_thread(...)``: the cluster on an event loop in a daemon thread (starts in
  milliseconds; shares the GIL with the test).

Both return a handle with ``.ports``, ``.urls``, ``.admin_port``, ``.stop()`` and admin
helpers (``crash``, ``restart``, ``set_faults``, ``state``) that talk to the admin port,
and both are context managers.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any, Sequence

from .cluster import SimCluster


class _AdminClient:
    host: str = "127.0.0.1"
    admin_port: int | None = None
    ports: list[int]

    @property
    def urls(self) -> list[str]:
        return [f"http://{self.host}:{p}" for p in self.ports]

    def _admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        if self.admin_port is None:
            raise RuntimeError("cluster started without an admin port")
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://{self.host}:{self.admin_port}{path}", data=data,
                                     method=method, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"null")

    def crash(self, server: int, restart_after_s: float | None = None) -> Any:
        """Crash server ``server`` (index or port); optionally auto-restart later."""
        body = {"restart_after_s": restart_after_s} if restart_after_s is not None else {}
        return self._admin("POST", f"/sim/servers/{server}/crash", body)

    def restart(self, server: int) -> Any:
        return self._admin("POST", f"/sim/servers/{server}/restart", {})

    def set_faults(self, server: int | None = None, **faults: Any) -> Any:
        """Patch faults on one server, or on all when ``server`` is None."""
        if server is None:
            return self._admin("POST", "/sim/faults", faults)
        return self._admin("POST", f"/sim/servers/{server}/faults", faults)

    def state(self, server: int | None = None) -> Any:
        if server is None:
            return self._admin("GET", "/sim/servers")
        return self._admin("GET", f"/sim/servers/{server}/state")

    def __enter__(self) -> "_AdminClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class SubprocessCluster(_AdminClient):
    """Handle on a ``python -m vllmsim serve`` child process."""

    def __init__(self, proc: subprocess.Popen[str], host: str, ports: list[int],
                 admin_port: int | None) -> None:
        self.proc = proc
        self.host = host
        self.ports = ports
        self.admin_port = admin_port

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def run_cluster_subprocess(n: int = 1, *, ports: Sequence[int] | None = None,
                           base_port: int = 0, host: str = "127.0.0.1",
                           args: Sequence[str] = (), timeout: float = 30.0,
                           python: str | None = None) -> SubprocessCluster:
    """Start ``python -m vllmsim serve`` and wait for its ``vllmsim: ready`` line.

    ``args`` are extra CLI flags, e.g. ``["--time-scale", "0.1", "--seed", "1"]``.
    """
    cmd = [python or sys.executable, "-m", "vllmsim", "serve", "--host", host, "--exit-with-parent"]
    if ports:
        cmd += ["--ports", ",".join(str(p) for p in ports)]
    else:
        cmd += ["--num-servers", str(n), "--port", str(base_port)]
    cmd += list(args)
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    found: list[int] = []
    admin: int | None = None
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    try:
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError("vllmsim did not become ready")
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"vllmsim exited early with status {proc.wait()}")
            line = line.strip()
            if line.startswith("vllmsim: server "):
                found.append(int(line.split(" listening on ")[1].split()[0].rsplit(":", 1)[1]))
            elif line.startswith("vllmsim: admin listening on "):
                admin = int(line.rsplit(":", 1)[1])
            elif line == "vllmsim: ready":
                break
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return SubprocessCluster(proc, host, found, admin)


class ThreadCluster(_AdminClient):
    """A ``SimCluster`` running on an event loop in a daemon thread."""

    def __init__(self, cluster: SimCluster) -> None:
        self.cluster = cluster
        self.host = cluster.host
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="vllmsim", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        try:
            await self.cluster.start()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.cluster.stop()

    def start(self, timeout: float = 30.0) -> "ThreadCluster":
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("vllmsim thread did not start")
        if self._error is not None:
            raise self._error
        self.ports = self.cluster.ports
        self.admin_port = self.cluster.admin_port
        return self

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        """Run a coroutine on the cluster's loop, e.g. ``h.call(h.cluster.servers[0].crash())``."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout)


def run_cluster_thread(n: int = 1, **kwargs: Any) -> ThreadCluster:
    """Start ``SimCluster(n, **kwargs)`` in a background thread and wait until it listens."""
    kwargs.setdefault("admin_port", 0)
    return ThreadCluster(SimCluster(n, **kwargs)).start()
