"""random: a uniformly random healthy endpoint."""

from __future__ import annotations

import random
from typing import Sequence

from ..core import Decision, Endpoint
from .base import Policy


class Random(Policy):
    name = "random"

    async def pick(self, ctx, candidates: Sequence[Endpoint]) -> Decision:
        return random.choice(candidates)


POLICY = Random
