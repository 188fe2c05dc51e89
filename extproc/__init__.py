"""ai-lb: an LLM-aware endpoint picker for Envoy, speaking ext_proc.

Data path: Envoy message (``processor``) -> ``RequestContext`` -> ``Policy.pick`` ->
answer (``mutations``). Routes and their policies come from ``config`` and live in
``runtime``; endpoints and their health come from ``endpoints``.
"""

from .config import Config, ConfigError, RouteConfig, load_config, parse_config
from .context import BodyError, RequestContext
from .endpoints import Endpoint
from .policies import ClusterPick, Decision, Fallback, Policy, PolicyEnv, Reject
from .policies.registry import register as register_policy

__all__ = [
    "BodyError", "ClusterPick", "Config", "ConfigError", "Decision", "Endpoint", "Fallback", "Policy", "PolicyEnv",
    "Reject", "RequestContext", "RouteConfig", "load_config", "parse_config", "register_policy",
]
__version__ = "0.1.0"
