"""The product as a user installs it: a wheel built from the checkout, installed into a fresh
venv outside the source tree, runs ``ai-lb demo`` from an unrelated directory.

This is what proves the layering for users: the reference Envoy config ships as package
data, the dev commands are found through entry points, and nothing reaches back into the
checkout (no PYTHONPATH, no cwd)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.install]

ROOT = Path(__file__).resolve().parents[2]


def _run(argv, cwd, timeout, env=None):
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{argv}: rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_wheel_installed_outside_the_checkout_runs_the_demo(tmp_path):
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)], tmp_path, 300)
    (wheel,) = wheels.glob("ai_lb-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, 120)
    py = venv / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{wheel}[demo]"], tmp_path, 600)

    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    # The package really comes from the venv, not from the checkout.
    r = _run([str(py), "-c", "import extproc, aibench, vllmsim; print(extproc.__file__)"], away, 60, env)
    assert str(venv) in r.stdout and str(ROOT) not in r.stdout
    r = _run([str(venv / "bin" / "ai-lb"), "--version"], away, 60, env)
    assert r.stdout.startswith("ai-lb ")
    r = _run([str(venv / "bin" / "ai-lb"), "demo", "--requests", "6"], away, 180, env)
    out = r.stdout
    assert "rotates over all backends: yes" in out, out[-3000:]
    assert "fail-open: 6/6 requests succeeded" in out, out[-3000:]
    # The bench's extra (matplotlib) is not installed with [demo]: the command still
    # explains itself instead of crashing.
    r = subprocess.run([str(venv / "bin" / "ai-lb"), "bench", "--help"], cwd=away, capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0 and "ai-lb bench" in r.stdout, r.stdout + r.stderr
