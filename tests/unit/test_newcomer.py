"""What a newcomer sees first: the commands' help, and the setup script's second run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _help(*argv: str) -> str:
    r = subprocess.run([sys.executable, "-m", "extproc", *argv, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return " ".join(r.stdout.split())  # argparse wraps lines at the terminal width


def test_sim_help_is_named_after_the_command_that_ran_it():
    assert _help("sim").startswith("usage: ai-lb sim")
    r = subprocess.run([sys.executable, "-m", "vllmsim", "--help"], capture_output=True, text=True, timeout=60)
    assert r.stdout.startswith("usage: vllmsim")  # run on its own, it keeps its own name


def test_bench_help_lists_systems_workloads_and_defaults_in_plain_text():
    from aibench.workloads import WORKLOADS

    out = _help("bench")
    assert out.startswith("usage: ai-lb bench")
    assert "``" not in out  # no reStructuredText markup
    for system in ("envoy-rr", "envoy-lr", "ai-lb:POLICY", "sglang-router", "vllm-router", "oracle"):
        assert system in out, system
    for policy in ("round_robin", "least_request", "prefix_cache", "global_least_request"):
        assert policy in out
    for w in WORKLOADS:
        assert w in out
    assert "(default: 4)" in out  # --backends
    assert "(default: 30.0)" in out  # --duration


def test_demo_help_explains_what_it_shows():
    out = _help("demo")
    assert out.startswith("usage: ai-lb demo")
    assert "prefix" in out and "round robin" in out and "fail-open" in out


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists(), reason="needs the checkout's .venv")
def test_setup_script_skips_pip_when_the_venv_is_up_to_date():
    first = subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    again = subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "installing" not in again.stdout and "up to date" in again.stdout, again.stdout
