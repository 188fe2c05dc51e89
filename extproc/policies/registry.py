"""Policy registry keyed by ``lb_policy`` (aliases included); the ``PolicyCatalog`` that
config loading checks names and ``lb_config`` fields against.

Built-in policies are listed in ``BUILTIN``: one module each, named like the policy and
exporting ``POLICY``. Third-party ones register from a plugin module named in the config's
``plugins`` list by calling ``register``. A name can be registered once: a plugin cannot
silently replace a built-in (or another plugin's) policy.
"""

from __future__ import annotations

import dataclasses
import importlib

from .base import Policy, PolicyConfig

_POLICIES: dict[str, type[Policy]] = {}


class DuplicatePolicy(ValueError):
    """A policy name (or alias) is already registered by another class."""


def register(cls: type[Policy]) -> type[Policy]:
    """Register a policy class (usable as a decorator). Registering the same class again
    (the same module and name, e.g. a plugin module imported twice) is a no-op; another
    class under a taken name raises ``DuplicatePolicy``."""
    if not (dataclasses.is_dataclass(cls.Config) and callable(getattr(cls.Config, "validate", None))):
        raise TypeError(f"policy {cls.__name__}: Config must be a dataclass with validate() "
                        f"(subclass PolicyConfig)")
    names = (cls.name, *cls.aliases)
    for n in names:
        old = _POLICIES.get(n)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise DuplicatePolicy(f"policy name {n!r} is already registered by {old.__module__}.{old.__qualname__}")
    for n in names:
        _POLICIES[n] = cls
    return cls


def get(name: str) -> type[Policy]:
    return _POLICIES[name]


def config_class(name: str) -> type[PolicyConfig]:
    return _POLICIES[name].Config


def names(lb_type: str | None = None) -> list[str]:
    return sorted(n for n, c in _POLICIES.items() if lb_type is None or c.lb_type == lb_type)


def load_plugin(module: str) -> None:
    importlib.import_module(module)


BUILTIN = (
    "round_robin",
    "random",
    "least_request",
    "endpoint_metrics",
    "global_least_request",
    "cluster_metrics",
    "prefix_cache",
    # the scheduling framework: a composition in config, and the named presets
    "scheduler",
    "request_num",
    "power_of_two",
    "process_tokens",
    "fd_metrics_score",
    "least_kv_cache",
    "cache_aware",
    "estimated_ttft",
    "precise_prefix_cache",
    # prefill/decode disaggregation: two pools, each one of the policies above
    "pd",
)


def _load_builtins() -> None:
    for mod in BUILTIN:
        register(importlib.import_module(f"{__package__}.{mod}").POLICY)


_load_builtins()
