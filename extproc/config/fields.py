"""Field-level checks behind the config validator: typed dataclasses from plain mappings.

``Validator`` accumulates problems, each prefixed with its field path, so that one pass
reports everything: a wrong type in one field never hides a range problem in another,
and a missing required field never hides the other fields' checks.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from typing import Any, Mapping

SECRET_WORDS = ("password", "secret", "token")  # never echo these values in error messages


def tname(x: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean",
            type(None): "nothing"}.get(type(x), type(x).__name__)


class Validator:
    """Accumulates problems; converts plain mappings into typed dataclasses."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def err(self, path: str, msg: str) -> None:
        self.problems.append(f"{path or '(top level)'}: {msg}")

    def unknown_keys(self, path: str, m: Mapping, allowed: set[str]) -> None:
        for k in m:
            if k not in allowed:
                self.err(f"{path}.{k}" if path else str(k),
                         f"unknown field; allowed: {', '.join(sorted(allowed))}" if allowed else "unknown field; this takes no fields")

    def str_list(self, path: str, x: Any) -> list[str]:
        if x is None:
            return []
        if not isinstance(x, list) or not all(isinstance(i, str) for i in x):
            self.err(path, f"expected a list of strings, got {tname(x)}")
            return []
        return x

    def dataclass_from(self, path: str, raw: Any, cls: type) -> Any:
        """``cls`` built from ``raw``, or None after recording every problem."""
        obj, bad = self.dataclass_partial(path, raw, cls)
        return None if bad else obj

    def dataclass_partial(self, path: str, raw: Any, cls: type) -> tuple[Any, set[str]]:
        """Build ``cls`` from ``raw``, checking field names and scalar types.

        Returns the instance and the names of the fields that had a problem; those hold
        their default (or, for a missing required field, a neutral placeholder), so the
        caller can still run the other fields' range checks. Ints are accepted where floats
        are expected; numeric strings are accepted for numbers because Higress documents
        ``rate_limit`` as a string.
        """
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            self.err(path, f"expected a mapping, got {tname(raw)}")
            return None, {"*"}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        bad: set[str] = set()
        # FastDeploy spells its keys with dashes (waiting-weight): the same field.
        named: dict[Any, Any] = {}
        for k in raw:
            f = k.replace("-", "_") if isinstance(k, str) and k not in fields else k
            if f in named:
                self.err(f"{path}.{k}", f"given twice (as {named[f]!r} and {k!r})")
                bad.add(f if f in fields else "*")
                continue
            named[f] = k
        for f_name, k in named.items():
            if f_name not in fields:
                self.err(f"{path}.{k}", f"unknown field; allowed: {', '.join(sorted(fields))}" if fields
                         else "unknown field; this takes no fields")
                bad.add("*")
        kwargs = {}
        for f_name, k in named.items():
            if f_name not in fields:
                continue
            val, tp = raw[k], hints[f_name]
            hook = _hook(tp)
            if hook is None and dataclasses.is_dataclass(tp):  # a nested block (e.g. queue.saturation)
                sub, sub_bad = self.dataclass_partial(f"{path}.{k}", val, tp)
                if sub is not None and not sub_bad:
                    kwargs[f_name] = sub
                else:
                    bad.add(f_name)
                continue
            if hook is not None and val is None and type(None) in typing.get_args(tp):
                kwargs[f_name] = None
                continue
            if hook is not None:  # a nested structure that validates itself (plugin lists)
                conv = hook(self, f"{path}.{k}", val)
                if conv is not None:
                    kwargs[f_name] = conv
                else:
                    bad.add(f_name)
                continue
            ok, conv = coerce(val, tp)
            if not ok:
                shown = "<redacted>" if any(w in str(k).lower() for w in SECRET_WORDS) else repr(val)
                self.err(f"{path}.{k}", f"expected {describe(tp)}, got {shown}")
                bad.add(f_name)
            else:
                kwargs[f_name] = conv
        for name, f in fields.items():
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and name not in named:
                self.err(f"{path}.{name}", "required")
                bad.add(name)
        for name in bad & set(fields):
            f = fields[name]
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                kwargs[name] = placeholder(hints[name])
            else:
                kwargs.pop(name, None)
        try:
            return cls(**kwargs), bad
        except Exception:  # noqa: BLE001 - a placeholder the class refuses: no further checks
            return None, bad | {"*"}

    def validate_partial(self, path: str, obj: Any, bad: set[str]) -> None:
        """Run ``obj.validate()`` (cross-field checks), skipping fields already in error."""
        if obj is None:
            return
        try:
            found = obj.validate()
        except Exception:  # noqa: BLE001 - validate() tripped over a placeholder
            return
        for sub, msg in found:
            if sub not in bad:
                self.err(f"{path}.{sub}", msg)


def _hook(tp: Any) -> Any:
    """A type's own parser (``__config_parse__(validator, path, raw)``), also inside ``X | None``."""
    hook = getattr(tp, "__config_parse__", None)
    if hook is None and typing.get_origin(tp) in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            hook = hook or getattr(arg, "__config_parse__", None)
    return hook


def placeholder(tp: Any) -> Any:
    """A neutral value of type ``tp`` for a missing required field (never reported)."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return typing.get_args(tp)[0]
    if origin in (typing.Union, types.UnionType):
        return placeholder(typing.get_args(tp)[0])
    if origin in (tuple, list):
        return ()
    return {int: 0, float: 0.0, str: "", bool: False}.get(tp)


def coerce(val: Any, tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, conv = coerce(val, arg)
            if ok:
                return True, conv
        return False, None
    if origin is typing.Literal:
        return (val in typing.get_args(tp)), val
    if tp is type(None):
        return val is None, None
    if tp is bool:
        return isinstance(val, bool), val
    if tp is int:
        if isinstance(val, bool):
            return False, None
        if isinstance(val, int):
            return True, val
        if isinstance(val, str) and val.strip().lstrip("-").isdigit():
            return True, int(val)
        return False, None
    if tp is float:
        if isinstance(val, bool):
            return False, None
        if isinstance(val, (int, float)):
            return True, float(val)
        if isinstance(val, str):
            try:
                return True, float(val)
            except ValueError:
                return False, None
        return False, None
    if tp is str:
        return isinstance(val, str), val
    if origin in (dict, Mapping, collections.abc.Mapping):
        kt, vt = typing.get_args(tp) or (Any, Any)
        if not isinstance(val, Mapping):
            return False, None
        out_d = {}
        for k, x in val.items():
            ok_k, ck = coerce(k, kt)
            ok_v, cv = coerce(x, vt)
            if not (ok_k and ok_v):
                return False, None
            out_d[ck] = cv
        return True, out_d
    if origin in (tuple, list):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(val, list):
            return False, None
        out = []
        for item in val:
            ok, conv = coerce(item, inner)
            if not ok:
                return False, None
            out.append(conv)
        return True, tuple(out)
    if tp is Any:
        return True, val
    return isinstance(val, tp), val


def describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return "a list"
    if origin in (dict, Mapping, collections.abc.Mapping):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))
