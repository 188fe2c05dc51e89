"""Envoy's side of the data path: the ext_proc service (``processor``: Envoy message ->
request context -> policy -> answer) and the prebuilt answers (``answers``). The reference
Envoy configs ship here as package data (``reference/``)."""

from importlib import resources
from pathlib import Path


def reference_config(name: str = "envoy.yaml") -> Path:
    """A reference config shipped with the package (``envoy.yaml``, ``envoy-compose.yaml``,
    ``ai-lb.yaml``, ``ai-lb-compose.yaml``)."""
    p = resources.files(__name__) / "reference" / name
    return Path(str(p))
