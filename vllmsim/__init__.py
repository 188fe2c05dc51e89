"""vllmsim: a vLLM-faithful server simulator for testing load-balancing policies.

Policies only mean something against servers that queue, batch and cache like vLLM;
this package simulates that (continuous batching, chunked prefill, paged KV cache with
prefix caching, preemption) behind vLLM's OpenAI API and /metrics, without a GPU.

Public API::

    async with SimCluster(n=3, time_scale=0.1) as cluster: ...   # asyncio
    handle = run_cluster_thread(3, time_scale=0.1)              # sync, in-process
    handle = run_cluster_subprocess(3, args=["--time-scale", "0.1"])  # sync, child process

See docs/simulator.md.
"""
from .cluster import SimCluster
from .faults import Faults
from .kv_events import KVEventsConfig
from .pd import KVTransferConfig
from .profile import OutputLen, Profile, load_profile
from .server import SERVER_HEADER, ServerConfig, SimServer
from .testing import run_cluster_subprocess, run_cluster_thread
from .tokenizer import MODEL_DIR, count_tokens, render_chat, tokenize

__all__ = [
    "MODEL_DIR", "SERVER_HEADER", "Faults", "KVEventsConfig", "KVTransferConfig", "OutputLen",
    "Profile", "ServerConfig", "SimCluster", "SimServer", "count_tokens", "load_profile",
    "render_chat", "run_cluster_subprocess", "run_cluster_thread", "tokenize",
]
__version__ = "0.1.0"
