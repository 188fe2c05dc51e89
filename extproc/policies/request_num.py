"""request_num (FastDeploy router): the endpoint with the fewest concurrent requests.

FastDeploy's default for mixed and decode instances: "iterates all instances, selects the
one with the fewest concurrent requests (in-memory counting)". Here: ``healthy`` ->
``requests`` (this instance's own in-flight counts, exact for its own traffic) ->
``max_score``, ties at random, read from an incremental index so the cost does not grow
with the fleet. The same composition as ``least_request``, under FastDeploy's name.
``lb_config``: ``max_candidates``, ``observe_errors``.
"""

from __future__ import annotations

from .least_request import LeastRequest


class RequestNum(LeastRequest):
    name = "request_num"


POLICY = RequestNum
