"""random: a uniformly random healthy endpoint."""

from __future__ import annotations

import random
from typing import Sequence

from ..endpoints import Endpoint
from .base import Decision, Policy


class Random(Policy):
    name = "random"

    async def pick(self, ctx, candidates: Sequence[Endpoint]) -> Decision:
        return random.choice(candidates)


POLICY = Random
