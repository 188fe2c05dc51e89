"""power_of_two (FastDeploy router): two random endpoints, the one with fewer in flight wins.

Power-of-two-choices: sampling two at random and taking the less loaded gives a maximum
load exponentially better than one random choice, at O(1) cost and with no herding,
because concurrent decisions sample different pairs. Composition: a random sample of
``choices`` (default 2) -> ``healthy`` -> ``requests`` (local counts) -> ``max_score``.
``lb_config``: ``choices``, ``observe_errors``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..scheduling import spec
from .base import PolicyConfig
from .scheduler import ScheduledPolicy


@dataclass(frozen=True)
class PowerOfTwoConfig(PolicyConfig):
    choices: int = 2
    observe_errors: bool = True

    def validate(self) -> list[tuple[str, str]]:
        return [] if self.choices >= 2 else [("choices", "must be >= 2")]


class PowerOfTwo(ScheduledPolicy):
    name = "power_of_two"
    Config = PowerOfTwoConfig
    preselect = "sample"

    def max_candidates(self, config: PowerOfTwoConfig) -> int:
        return config.choices

    def profile_specs(self, config):
        return [spec("filter", "healthy")], [spec("scorer", "requests")], spec("picker", "max_score")


POLICY = PowerOfTwo
