"""least_request: fewest in-flight requests *through this ai-lb instance*; ties at random.

Local counts only; ``global_least_request`` shares counts across instances through the
state store. Ties are broken at random so a burst arriving at an idle cluster spreads
instead of herding onto the first endpoint.
"""

from __future__ import annotations

import random
from typing import Sequence

from ..core import Decision, Endpoint
from .base import Policy


class LeastRequest(Policy):
    name = "least_request"

    async def pick(self, ctx, candidates: Sequence[Endpoint]) -> Decision:
        get = self.env.load.requests
        best: list[Endpoint] = []
        low = None
        for e in candidates:
            n = get(e.address)
            if low is None or n < low:
                low, best = n, [e]
            elif n == low:
                best.append(e)
        return best[0] if len(best) == 1 else random.choice(best)


POLICY = LeastRequest
