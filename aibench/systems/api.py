"""The contract between the harness and a system under test."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass
class Backends:
    """The simulated (or user-named) vLLM servers every system is put in front of."""

    addresses: list[str]                 # "127.0.0.1:18000", ...
    model: str = "sim-model"
    admin_url: str | None = None         # vllmsim cluster admin (for the oracle): http://127.0.0.1:P
    pids: dict[str, int | list[int]] = field(default_factory=dict)
    roles: list[str] = field(default_factory=list)  # per address (prefill | decode) when started split by role


class System(Protocol):
    """One load balancer in front of ``Backends``. ``start`` returns the base URL clients use
    (``http://127.0.0.1:PORT``; requests go to ``<url>/v1/chat/completions``)."""

    name: str

    def start(self, backends: Backends, workdir: Path) -> str: ...

    def stop(self) -> None: ...

    def pids(self) -> dict[str, int]:
        """Component name -> pid, for CPU accounting (e.g. {"envoy": 123, "ai-lb": 456})."""
        ...

    def served_counts(self) -> tuple[str, dict[str, float]] | None:
        """(source, backend -> requests so far) from the system's own metrics, if it has them."""
        ...

    def verdict(self) -> tuple[str, list[str]]:
        """("ok" | "degraded", notes): whether the system did its job during the run."""
        ...
