"""round_robin: rotate through the healthy endpoints.

Mostly a baseline, and the smallest example of a policy.
"""

from __future__ import annotations

from typing import Sequence

from ..core import Decision, Endpoint
from .base import Policy


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, config, env) -> None:
        super().__init__(config, env)
        self._next = 0

    async def pick(self, ctx, candidates: Sequence[Endpoint]) -> Decision:
        i = self._next % len(candidates)
        self._next = i + 1
        return candidates[i]


POLICY = RoundRobin
