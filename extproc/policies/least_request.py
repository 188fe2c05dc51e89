"""least_request: fewest in-flight requests *through this ai-lb instance*; ties at random.

A scheduling-framework composition: ``healthy`` (endpoints failing fast are ejected) ->
``requests`` (local counts) -> ``max_score``. Local counts only: ``global_least_request``
shares counts across instances through the state store. Ties are broken at random, so a
burst arriving at an idle cluster spreads instead of herding onto the first endpoint.
Decisions read the lowest buckets of an incremental index, so they cost the same at 8 or
1,000 endpoints. ``lb_config``: ``max_candidates``, ``observe_errors`` (see scheduler).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..scheduling import spec
from .scheduler import LoadAwareConfig, ScheduledPolicy


@dataclass(frozen=True)
class CountConfig(LoadAwareConfig):
    # The index key is the score itself here, so its lowest buckets already hold the answer.
    max_candidates: int = 8


class LeastRequest(ScheduledPolicy):
    name = "least_request"
    Config = CountConfig

    def profile_specs(self, config):
        return [spec("filter", "healthy")], [spec("scorer", "requests")], spec("picker", "max_score")


POLICY = LeastRequest
