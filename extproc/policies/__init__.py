"""Load-balancing policies: one module each (named like the policy), behind ``base.Policy``,
found by ``registry``."""

from . import registry
from .base import NoConfig, Policy, PolicyConfig, PolicyEnv

__all__ = ["NoConfig", "Policy", "PolicyConfig", "PolicyEnv", "registry"]
