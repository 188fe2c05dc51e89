"""Policy registry keyed by ``lb_policy`` (aliases included).

Built-in policies are listed in ``BUILTIN``; third-party ones register from a plugin
module named in the config's ``plugins`` list by calling ``register``.
"""

from __future__ import annotations

import importlib

from .base import Policy

_POLICIES: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    """Register a policy class (usable as a decorator)."""
    for n in (cls.name, *cls.aliases):
        _POLICIES[n] = cls
    return cls


def get(name: str) -> type[Policy]:
    return _POLICIES[name]


def names(lb_type: str | None = None) -> list[str]:
    return sorted(n for n, c in _POLICIES.items() if lb_type is None or c.lb_type == lb_type)


def load_plugin(module: str) -> None:
    importlib.import_module(module)


# Built-in policies: one module each, exporting ``POLICY``. Adding one = a new module + a line here.
BUILTIN = (
    "round_robin",
    "random_pick",
    "least_request",
    "endpoint_metrics",
    "global_least_request",
    "cluster_metrics",
    "prefix_cache",
)


def _load_builtins() -> None:
    for mod in BUILTIN:
        register(importlib.import_module(f"{__package__}.{mod}").POLICY)


_load_builtins()
