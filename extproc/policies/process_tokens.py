"""process_tokens (FastDeploy router): the endpoint with the fewest prompt tokens in flight.

FastDeploy's default for prefill instances: "selects the one with the fewest tokens
currently being processed (in-memory counting), suitable for prefill long-request load
balancing". Each request is counted with its estimated prompt tokens (the buffered
body's or ``content-length``'s size / 4, so the body is not needed) until it ends.
Composition: ``healthy`` -> ``tokens`` -> ``max_score``, ties at random, from an index
bucketed by 256 tokens beyond ``max_candidates``. ``lb_config``: ``max_candidates``,
``observe_errors``.
"""

from __future__ import annotations

from ..scheduling import spec
from .least_request import CountConfig
from .scheduler import ScheduledPolicy


class ProcessTokens(ScheduledPolicy):
    name = "process_tokens"
    Config = CountConfig

    def index_key(self):
        return lambda r: r.tokens // 256

    def profile_specs(self, config):
        return [spec("filter", "healthy")], [spec("scorer", "tokens")], spec("picker", "max_score")


POLICY = ProcessTokens
