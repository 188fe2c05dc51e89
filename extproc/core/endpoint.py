"""An upstream endpoint, as Envoy's override_host load-balancing policy names it."""

from __future__ import annotations

from dataclasses import dataclass

#: What an endpoint does in a prefill/decode (PD) fleet, FastDeploy's names: ``prefill``
#: computes prompts, ``decode`` generates from KV-cache it is handed, ``mixed`` does both
#: (an ordinary server). "" is an endpoint that declared nothing (read as mixed).
ROLES = ("prefill", "decode", "mixed")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One upstream host as Envoy's override_host policy understands it (``ip:port``), its
    health, and its role in a PD fleet (from the config, its registration, or the endpoint
    itself: a pod's ``llm-d.ai/role`` label)."""

    address: str
    healthy: bool = True
    role: str = ""

    def __str__(self) -> str:
        return self.address
