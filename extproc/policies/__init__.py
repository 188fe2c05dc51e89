"""Load-balancing policies: one module each, behind ``base.Policy``, found by ``registry``."""

from .base import ClusterPick, Decision, Fallback, Policy, PolicyEnv, Reject
from . import registry

__all__ = ["ClusterPick", "Decision", "Fallback", "Policy", "PolicyEnv", "Reject", "registry"]
