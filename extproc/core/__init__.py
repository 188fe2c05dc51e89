"""The request-level vocabulary every layer shares: endpoints, the request context, the
decision a policy returns, and the directory of candidate endpoints per route."""

from .context import BodyError, RequestContext
from .decision import ClusterPick, Decision, Fallback, Pick, Reject, Wait
from .directory import EndpointDirectory
from .endpoint import Endpoint

__all__ = ["BodyError", "ClusterPick", "Decision", "Endpoint", "EndpointDirectory", "Fallback", "Pick", "Reject",
           "RequestContext", "Wait"]
