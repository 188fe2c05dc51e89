"""Reading a config file's YAML strictly, with errors that are safe to log.

* Duplicate keys are errors (PyYAML keeps the last one silently): a doubled ``routes:``
  or ``lb_config:`` would drop half a config without a word.
* Error messages name a position and the problem, never the offending line: a config
  line may hold a Redis password, and reload errors go to the log.
* A mapping key that YAML reads as something other than a string (``off:`` is a
  boolean, ``1:`` a number) stays a string here, marked ``ImplicitKey``, so the validator
  can say what happened in the user's own words.
"""

from __future__ import annotations

from typing import Any

import yaml

_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlProblem(Exception):
    """The text is not acceptable YAML; ``str()`` is safe to log (no file content)."""


class ImplicitKey(str):
    """A mapping key written unquoted that YAML would read as a non-string (``off``)."""

    yaml_value: Any = None


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and keeps non-string keys' source text."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if not isinstance(node, yaml.MappingNode):
            return super().construct_mapping(node, deep)
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:  # the mapping's own keys, before merges (<<) are applied
            if key_node.tag == _MERGE_TAG:
                continue
            key = self._key(key_node, deep)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # unhashable: SafeLoader reports it below
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {str(key)!r} (first given on line {first + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        self.flatten_mapping(node)
        out: dict = {}
        for key_node, value_node in node.value:
            key = self._key(key_node, deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        "found an unhashable key", key_node.start_mark) from None
            out[key] = self.construct_object(value_node, deep=deep)
        return out

    def _key(self, key_node: yaml.Node, deep: bool) -> Any:
        key = self.construct_object(key_node, deep=deep)
        if isinstance(key_node, yaml.ScalarNode) and not isinstance(key, str) and key_node.style is None:
            k = ImplicitKey(key_node.value)
            k.yaml_value = key
            return k
        return key


def load_yaml(data: bytes | str) -> Any:
    """Parse one YAML document; raises YamlProblem with a loggable message."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise YamlProblem(f"not a UTF-8 text file (byte 0x{data[e.start]:02x} at offset {e.start}); "
                              "is it a binary or half-written file?") from None
    else:
        text = data
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        raise YamlProblem(_marked(e)) from None
    except yaml.reader.ReaderError as e:
        ch = e.character if isinstance(e.character, int) else ord(e.character) if e.character else 0
        raise YamlProblem(f"character {e.position + 1}: invalid YAML: unacceptable character #x{ch:04x} "
                          "(a binary file?)") from None
    except yaml.YAMLError as e:
        raise YamlProblem(f"invalid YAML: {type(e).__name__}") from None


def _marked(e: yaml.MarkedYAMLError) -> str:
    """``line L, column C: invalid YAML: problem (context, line L2)``; no snippet of the text."""
    mark = e.problem_mark or e.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = e.problem or e.context or "syntax error"
    if e.problem and e.context:
        ctx_at = f" on line {e.context_mark.line + 1}" if e.context_mark is not None else ""
        what += f" ({e.context}{ctx_at})"
    return f"{where}invalid YAML: {what}"


def describe_key(k: ImplicitKey) -> str:
    v = k.yaml_value
    kind = "a boolean" if isinstance(v, bool) else "null" if v is None else "a number" if isinstance(v, (int, float)) \
        else type(v).__name__
    return f"YAML reads `{k}` as {kind}; quote the name, e.g. '{k}'"
