"""What every system under test shares: process bookkeeping, bounded waits, failure, stop."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

from .. import devstack as ds
from .api import Backends

# -- helpers ----------------------------------------------------------------------------
def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise RuntimeError(f"backend address must be ip:port, got {addr!r}")
    return host.strip("[]"), int(port)


def _http_ok(url: str, timeout: float = 0.5) -> tuple[int, str]:
    try:
        return ds.http_get(url, timeout=timeout)
    except (OSError, ValueError):
        return 0, ""


class _Base:
    """Process bookkeeping shared by every system: spawn, bounded waits, failure, stop."""

    name: str = "system"

    def __init__(self, start_timeout: float = 30.0) -> None:
        self.start_timeout = start_timeout
        self.procs: list[ds.Proc] = []
        self.logdir: Path | None = None
        self.url: str | None = None
        self._deadline = 0.0

    # lifecycle helpers
    def _begin(self, backends: Backends, workdir: Path) -> None:
        if self.procs:
            raise RuntimeError(f"{self.name}: already started")
        if not backends.addresses:
            raise RuntimeError(f"{self.name}: no backends")
        self.logdir = Path(workdir) / self.name
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._deadline = time.monotonic() + self.start_timeout

    def _left(self) -> float:
        return max(0.1, self._deadline - time.monotonic())

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> ds.Proc:
        assert self.logdir is not None
        try:
            p = ds.spawn(name, argv, self.logdir, env=env)
        except OSError as e:
            raise RuntimeError(f"{self.name}: cannot start {name} ({argv[0]}): {e}") from e
        self.procs.append(p)
        return p

    def _wait(self, cond: Callable[[], Any], what: str) -> None:
        """Poll ``cond`` until true (exceptions count as not yet) or the start deadline."""
        while True:
            for p in self.procs:
                if not p.alive():
                    raise RuntimeError(f"{p.name} exited with {p.p.returncode} while waiting for: {what}")
            try:
                if cond():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.monotonic() >= self._deadline:
                raise RuntimeError(f"timed out after {self.start_timeout:g}s waiting for: {what}")
            time.sleep(0.1)

    def _fail(self, err: BaseException) -> RuntimeError:
        tails = "\n".join(f"--- {p.name} log ({p.log_path}) ---\n{p.log_tail(3000)}" for p in self.procs)
        self.stop()
        return RuntimeError(f"{self.name} failed to start: {err}\n{tails}")

    def start(self, backends: Backends, workdir: Path) -> str:
        self._begin(backends, workdir)
        try:
            self.url = self._start(backends)
        except BaseException as e:
            err = self._fail(e)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise err from e
        return self.url

    def _start(self, backends: Backends) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def stop(self) -> None:
        """Stop every process (reverse start order); safe to call any number of times."""
        for p in reversed(self.procs):
            try:
                p.stop(timeout=5)
            except Exception:  # noqa: BLE001
                pass
            try:  # anything the process left in its own session (start_new_session=True)
                os.killpg(p.p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError, OSError):
                pass
        self.procs.clear()
        self.url = None

    def pids(self) -> dict[str, int]:
        return {p.name: p.p.pid for p in self.procs if p.alive()}

    # What the harness asks a running system after the load (defaults: nothing to add).
    def served_counts(self) -> tuple[str, dict[str, float]] | None:
        """(source, backend address -> requests so far) when the system counts its picks
        itself (its metrics); None when it does not, or tells per response instead."""
        return None

    def verdict(self) -> tuple[str, list[str]]:
        """("ok" | "degraded", notes) about whether the system did its job during the run."""
        return "ok", []

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def split_inline(spec: str, rest: str) -> tuple[str, dict[str, Any] | None]:
    """``NAME{json}`` (the part of ``spec`` after its prefix) -> (NAME, the JSON object, or
    None when there is none)."""
    if "{" not in rest:
        return rest, None
    head, _, js = rest.partition("{")
    try:
        cfg = json.loads("{" + js)
    except ValueError as e:
        raise ValueError(f"system {spec!r}: the lb_config after the name is not JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"system {spec!r}: lb_config must be a JSON object")
    return head, cfg
