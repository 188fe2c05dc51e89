"""Injectable failures, so a gateway's health checks, retries and outlier ejection can be
tested against a backend that misbehaves on demand.

* ``slowdown``: multiplies every engine step (a throttled or noisy-neighbour GPU);
* ``error_rate``/``error_status``: that fraction of inference requests is answered at
  once with an error (decided by a seeded RNG, so runs repeat);
* ``hang``: inference requests are accepted and never answered (the connection stays
  open until the client gives up); /health, /metrics and admin routes still answer, as
  they do when a real engine wedges;
* crash/restart are not flags but actions on the server (see server.py).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Mapping


@dataclass
class Faults:
    slowdown: float = 1.0
    error_rate: float = 0.0
    error_status: int = 500
    hang: bool = False

    def update(self, data: Mapping[str, Any]) -> None:
        """Apply a partial update; raises ValueError on unknown keys or bad values."""
        unknown = set(data) - {"slowdown", "error_rate", "error_status", "hang"}
        if unknown:
            raise ValueError(f"unknown fault keys: {sorted(unknown)}")
        new = Faults(**asdict(self))
        if "slowdown" in data:
            v = data["slowdown"]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ValueError("slowdown must be a number > 0")
            new.slowdown = float(v)
        if "error_rate" in data:
            v = data["error_rate"]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError("error_rate must be a number in [0, 1]")
            new.error_rate = float(v)
        if "error_status" in data:
            v = data["error_status"]
            if isinstance(v, bool) or not isinstance(v, int) or not 400 <= v <= 599:
                raise ValueError("error_status must be an integer in [400, 599]")
            new.error_status = v
        if "hang" in data:
            if not isinstance(data["hang"], bool):
                raise ValueError("hang must be a boolean")
            new.hang = data["hang"]
        self.__dict__.update(asdict(new))

    def reset(self) -> None:
        self.__dict__.update(asdict(Faults()))

    def should_fail(self, rng: random.Random) -> bool:
        return self.error_rate > 0 and rng.random() < self.error_rate

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
