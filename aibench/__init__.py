"""aibench: ai-lb side by side with the routers people use today (``ai-lb bench``).

Modules: ``traffic`` (conversations and turns), ``workloads`` (seeded synthetic traffic),
``replay`` (Mooncake traces, request logs), ``loadgen`` (open-loop client that measures
TTFT, inter-token and end-to-end latency), ``stats``, ``backends`` (simulated or your own
servers: probing, cache resets, counters), ``systems`` (start/stop each system under test in
front of the same backends; ``systems/catalog.py`` names them), ``monitor`` (CPU of every
component, machine saturation), ``runner`` (one run), ``report``/``plots``/``compare``
(JSON, Markdown, PNG; diffs of two runs), ``cli`` (the command), ``tiny_model`` (a
random-weight model for a real vLLM).
"""
