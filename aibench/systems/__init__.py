"""The systems under test, each started in front of the same ``Backends``.

* ``EnvoyNative(policy)``: the reference ``envoy/envoy.yaml`` without ai-lb (ext_proc filter and
  ai_lb cluster removed), the backends' cluster balanced by Envoy itself (``round_robin``,
  ``least_request`` or ``random``).
* ``EnvoyAiLb(policy, lb_config, store)``: the reference config as shipped + ``python -m extproc
  serve`` with one route ``llm`` (hosts discovered from Envoy's admin API).
* ``SglangRouter(policy)`` / ``VllmRouter(policy)``: the Rust routers from PyPI
  (``sglang-router``, ``vllm-router``), installed on first use into ``~/.cache/ai-lb/bench-venv`` (or the venv
  named by ``$AIBENCH_ROUTER_VENV``) because they pull in heavy dependencies.
* ``Oracle()``: ``aibench.oracle``, a proxy that asks every simulated server for its true cache
  hits and queue before each request.

Every ``start`` is bounded (``start_timeout``, 30 s by default, not counting a first-time router
install) and on failure stops what it started and raises ``RuntimeError`` with the log tails.
``stop`` is idempotent. Logs go to ``workdir/<system name>/``. After a run the harness asks
``served_counts()`` (picks per backend from the system's own metrics, if it has them) and
``verdict()`` (whether it did its job: the oracle is "degraded" when it could not probe).
Names, specs and the default list: ``catalog.py``.
"""

from __future__ import annotations

from .api import Backends, System
from .catalog import default_systems, make_system
from .envoy import EnvoyAiLb, EnvoyNative, native_envoy_config
from .peers import Oracle, SglangRouter, VllmRouter, ensure_router_venv, router_venv

__all__ = ["Backends", "System", "EnvoyNative", "EnvoyAiLb", "SglangRouter", "VllmRouter", "Oracle",
           "ensure_router_venv", "router_venv", "native_envoy_config", "default_systems", "make_system"]
