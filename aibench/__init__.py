"""aibench: ai-lb side by side with the routers people use today (``ai-lb bench``).

Modules: ``workloads`` (seeded request schedules), ``loadgen`` (open-loop client that
measures TTFT, inter-token and end-to-end latency), ``systems`` (start/stop each system
under test in front of the same backends), ``monitor`` (CPU of every component, machine
saturation), ``report`` (JSON, Markdown, PNG plots), ``cli`` (the command).
"""
