"""The plugin registry, and the config entries that name plugins.

A profile is written in a route's ``lb_config`` as lists of ``{name, weight, ...}``
entries::

    filters: [{name: healthy}, {name: queue_below, threshold: 50}]
    scorers: [{name: queue, weight: 2}, {name: kv_cache, weight: 2}]
    picker: {name: max_score}

Each entry is validated against its plugin's typed ``Config`` (the keys besides ``name``
and ``weight``), with field paths (``routes.llm.lb_config.scorers[1].weight: ...``), all
problems in one pass, like the rest of the config. ``FilterList``, ``ScorerList`` and
``PickerSpec`` are the field types a policy's config dataclass uses for them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Mapping

from .framework import Filter, Picker, Plugin, Scorer

_PLUGINS: dict[str, dict[str, type[Plugin]]] = {"filter": {}, "scorer": {}, "picker": {}}


def register(cls: type[Plugin]) -> type[Plugin]:
    reg = _PLUGINS[cls.kind]
    old = reg.get(cls.name)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"{cls.kind} {cls.name!r} is already registered by {old.__module__}")
    reg[cls.name] = cls
    return cls


def names(kind: str) -> list[str]:
    return sorted(_PLUGINS[kind])


def get(kind: str, name: str) -> type[Plugin]:
    return _PLUGINS[kind][name]


@dataclass(frozen=True)
class PluginSpec:
    """One validated config entry: which plugin, its weight (scorers), its typed config."""

    kind: str
    name: str
    config: Any = None
    weight: float = 1.0

    def build(self) -> Plugin:
        cls = get(self.kind, self.name)
        if self.kind == "scorer":
            return cls(self.config, self.weight)
        return cls(self.config)


def spec(kind: str, name: str, weight: float = 1.0, **config: Any) -> PluginSpec:
    """A spec built in code (the presets): unknown names and bad fields are programming errors."""
    cls = get(kind, name)
    cfg = cls.Config(**config) if cls.Config is not type(None) else None
    return PluginSpec(kind, name, cfg, weight)


def _parse_entry(v: Any, path: str, kind: str, raw: Any) -> PluginSpec | None:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, Mapping):
        v.err(path, f"expected a mapping with 'name' (one of: {', '.join(names(kind))})")
        return None
    name = raw.get("name")
    if name not in _PLUGINS[kind]:
        v.err(f"{path}.name", f"unknown {kind} {name!r}; allowed: {', '.join(names(kind))}")
        return None
    cls = _PLUGINS[kind][name]
    rest = {k: x for k, x in raw.items() if k not in ("name", "weight")}
    weight = 1.0
    if kind == "scorer":
        w = raw.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            v.err(f"{path}.weight", f"expected a number >= 0 (0 switches the scorer off), got {w!r}")
            return None
        weight = float(w)
    elif "weight" in raw:
        v.err(f"{path}.weight", f"a {kind} has no weight")
        return None
    cfg = None
    if cls.Config is type(None):
        if rest:
            v.unknown_keys(path, rest, set())
            return None
    else:
        cfg = v.dataclass_from(path, rest, cls.Config)
        if cfg is None:
            return None
        for sub, msg in getattr(cfg, "validate", lambda: [])():
            v.err(f"{path}.{sub}", msg)
    return PluginSpec(kind, name, cfg, weight)


class _SpecList(tuple):
    kind = ""

    @classmethod
    def __config_parse__(cls, v: Any, path: str, raw: Any) -> Any:
        if not isinstance(raw, list):
            v.err(path, f"expected a list of {cls.kind}s ({{name: ..., ...}})")
            return None
        n0 = len(v.problems)
        out = [_parse_entry(v, f"{path}[{i}]", cls.kind, x) for i, x in enumerate(raw)]
        return None if len(v.problems) > n0 else cls(out)


class FilterList(_SpecList):
    kind = "filter"


class ScorerList(_SpecList):
    kind = "scorer"


class PickerSpec:
    @classmethod
    def __config_parse__(cls, v: Any, path: str, raw: Any) -> Any:
        return _parse_entry(v, path, "picker", raw)


BUILTIN = {
    "filter": ("healthy", "fresh_metrics", "queue_below", "kv_room", "band", "pick_share", "higress_chain"),
    "scorer": ("requests", "tokens", "queue", "kv_cache", "fd_metrics", "load", "prefix", "estimated_ttft",
               "precise_prefix"),
    "picker": ("max_score", "weighted_random", "top_k", "near_ties"),
}


def _load_builtins() -> None:
    folders = {"filter": "filters", "scorer": "scorers", "picker": "pickers"}
    for kind, mods in BUILTIN.items():
        for m in mods:
            register(importlib.import_module(f"{__package__}.{folders[kind]}.{m}").PLUGIN)


_load_builtins()

__all__ = ["Filter", "FilterList", "Picker", "PickerSpec", "PluginSpec", "Scorer", "ScorerList", "get", "names",
           "register", "spec"]
