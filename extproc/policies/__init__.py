"""Load-balancing policies: one module each, behind ``base.Policy``, found by ``registry``."""

from .base import Decision, Fallback, Policy, PolicyEnv, Reject
from . import registry

__all__ = ["Decision", "Fallback", "Policy", "PolicyEnv", "Reject", "registry"]
