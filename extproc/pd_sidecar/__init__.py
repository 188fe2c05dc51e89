"""``ai-lb pd-sidecar``: the proxy in front of each decode server that makes ai-lb's
prefill/decode picks work with real vLLM (NixlConnector): prefill on the server ai-lb
named in ``x-prefiller-host-port``, then decode here with the KV it produced
(``proxy.py``); the command line in ``cli.py``."""

from .proxy import PREFILL_HEADER, Sidecar, SidecarConfig

__all__ = ["PREFILL_HEADER", "Sidecar", "SidecarConfig"]
