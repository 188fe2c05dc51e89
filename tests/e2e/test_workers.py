"""``server.workers: 2`` behind the real Envoy: one port, metrics from every worker, hot
reload, a crashed worker replaced, a clean stop."""

from __future__ import annotations

import os
import signal
import time

import harness as h


def children(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(x) for x in f.read().split()}
    except OSError:
        return set()


def workers_reporting(text: str, metric: str, **labels) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.labels["worker"] for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == metric and "worker" in s.labels and all(s.labels.get(k) == v for k, v in labels.items())}


def test_two_workers_serve_one_port_reload_survive_a_crash_and_stop(stack):
    ai = stack.ai_lb({"llm": {"lb_policy": "round_robin", "endpoints": {"cluster": "llm_backends"}}},
                     server={"workers": 2, "completions": "access_log"})
    pid = ai.p.pid
    assert h.eventually(lambda: len(children(pid)), 2) == 2
    res = h.load(stack.url + h.CHAT, n=40, concurrency=4)
    assert res.statuses == {200: 40}
    text = stack.metrics()   # served by the supervisor, from every worker's own page
    assert workers_reporting(text, "ai_lb_completions_total") == {"0", "1"}
    assert h.eventually(lambda: h.metric_value(stack.metrics(), "ai_lb_requests_done_total"), 40.0) == 40.0

    # hot reload: every worker applies the new file
    stack.write_config({"llm": {"lb_policy": "least_request", "endpoints": {"cluster": "llm_backends"}}},
                       server={"workers": 2, "completions": "access_log"})
    assert h.eventually(lambda: workers_reporting(stack.metrics(), "ai_lb_config_reloads_total", result="applied"),
                        {"0", "1"}) == {"0", "1"}

    # a crashed worker is replaced; requests keep flowing (Envoy fails open meanwhile)
    victim = sorted(children(pid))[0]
    os.kill(victim, signal.SIGKILL)
    assert h.eventually(lambda: len(children(pid) - {victim}), 2, timeout=8) == 2
    assert h.load(stack.url + h.CHAT, n=20, concurrency=2).statuses == {200: 20}

    # SIGTERM: the workers drain and the supervisor exits, leaving none behind
    kids = children(pid)
    ai.p.send_signal(signal.SIGTERM)
    ai.p.wait(15)
    deadline = time.monotonic() + 5
    while any(os.path.exists(f"/proc/{k}") for k in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(os.path.exists(f"/proc/{k}/stat") and open(f"/proc/{k}/stat").read().split()[2] != "Z"
                   for k in kids)
    stack.procs.remove(ai)
