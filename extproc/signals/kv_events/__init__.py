"""The engines' own KV-cache events (vLLM ``--kv-events-config``, ZeroMQ): which backend
holds which KV block, exactly.

``wire`` decodes vLLM's messages, ``stream`` follows one backend's sequence (gaps,
replay, restarts, liveness), ``sockets`` is the pyzmq side (bind or connect, monitor,
replay requests), ``hub`` runs one stream per backend for one ``spec.KvEventsSpec`` and
feeds the index (``state.kv_block_index``). See docs/policies/precise_prefix.md.
"""

from .hub import KvEventsHub
from .spec import EndpointMap, KvEventsSpec
from .stream import EventStream

__all__ = ["EndpointMap", "EventStream", "KvEventsHub", "KvEventsSpec"]
