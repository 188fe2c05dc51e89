"""Test plugin policies for the GIE tests.

``test_header_pick`` mirrors the picker the GIE conformance suite deploys: it routes to the
endpoints listed in the request header ``test-epp-endpoint-selection`` (first, then the
rest as fallbacks). It exists to replay the conformance cases against our real Envoy; a
real policy must never take routing orders from a client header.

``test_first`` always picks the first candidate (a static list's order), so a test can
make the primary an endpoint that refuses connections and watch Envoy retry the list.
"""

from __future__ import annotations

from extproc import Policy, register_policy
from extproc.core import Fallback, Pick

HEADER = "test-epp-endpoint-selection"


@register_policy
class HeaderPick(Policy):
    name = "test_header_pick"

    async def pick(self, ctx, candidates):
        by = {e.address: e for e in candidates}
        chosen = [by[a.strip()] for a in ctx.headers.get(HEADER, "").split(",") if a.strip() in by]
        if not chosen:
            return Fallback("policy_error")
        return Pick(chosen[0], fallbacks=tuple(chosen[1:]))


@register_policy
class First(Policy):
    name = "test_first"

    async def pick(self, ctx, candidates):
        return candidates[0]
