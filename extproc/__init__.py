"""ai-lb: an LLM-aware endpoint picker for Envoy, speaking ext_proc.

Data path: Envoy message (``envoy.processor``) -> ``core.RequestContext`` -> a policy
(``policies``) -> answer (``envoy.answers``). Routes and their policies come from
``config`` and live in ``runtime``; candidates come from ``core.directory``, fed by
``discovery``; policies read shared ``signals`` (load view, scraped metrics, prefix keys)
and ``state`` (memory or Redis). ``server`` wires one process; ``cli`` is the command.
"""

__version__ = "0.2.0"

# The plugin API, loaded on first use so that importing one layer does not import them all.
_API = {
    "Policy": "extproc.policies.base", "PolicyConfig": "extproc.policies.base", "PolicyEnv": "extproc.policies.base",
    "register_policy": ("extproc.policies.registry", "register"),
    "Endpoint": "extproc.core", "RequestContext": "extproc.core", "BodyError": "extproc.core",
    "ClusterPick": "extproc.core", "Fallback": "extproc.core", "Reject": "extproc.core", "Decision": "extproc.core",
    "Config": "extproc.config", "RouteConfig": "extproc.config", "ConfigError": "extproc.config",
    "load_config": "extproc.runtime", "parse_config": "extproc.runtime",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    where = _API.get(name)
    if where is None:
        raise AttributeError(f"module 'extproc' has no attribute {name!r}")
    import importlib

    mod, attr = where if isinstance(where, tuple) else (where, name)
    return getattr(importlib.import_module(mod), attr)
