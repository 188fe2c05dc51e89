"""A real redis-server on a free loopback port, for tests (installed by scripts/setup.sh)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from .devstack import free_ports, wait_port


class RedisServer:
    """``args`` are extra redis-server options (``--requirepass``, ``--unixsocket``,
    ``--tls-port``...); ``wait_for`` is the TCP port to wait for (default ``port``)."""

    def __init__(self, tmp: Path, port: int | None = None, args: list[str] | None = None,
                 wait_for: int | None = None) -> None:
        self.port = port or free_ports(1)[0]
        self.tmp = tmp
        self.args = list(args or [])
        self.wait_for = wait_for
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found: run scripts/setup.sh (apt-get install redis-server)")
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.tmp), *self.args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.wait_for or self.port, timeout=10)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def restart(self) -> None:
        self.stop()
        time.sleep(0.1)
        self.start()
