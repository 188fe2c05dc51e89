"""An upstream endpoint, as Envoy's override_host load-balancing policy names it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One upstream host as Envoy's override_host policy understands it (``ip:port``)."""

    address: str
    healthy: bool = True

    def __str__(self) -> str:
        return self.address
