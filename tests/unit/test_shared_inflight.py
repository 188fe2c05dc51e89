"""The in-flight table shared by worker processes: each writes its own row, readers sum."""

import os

import pytest

from extproc.signals.load import LoadView
from extproc.state.shared_inflight import GEN, SharedInflight, SharedTable
from extproc.supervisor import merged_metrics


def test_rows_are_summed_and_each_worker_writes_only_its_own():
    t = SharedTable(3, slots=64)
    w = [SharedInflight(t, i) for i in range(3)]
    w[0].inc("10.0.0.1:80")
    w[1].inc("10.0.0.1:80")
    w[1].inc("10.0.0.2:80")
    assert [x.get("10.0.0.1:80") for x in w] == [2, 2, 2]
    assert w[2].get("10.0.0.2:80") == 1 and w[2].get("10.0.0.9:80") == 0
    assert (w[0].own("10.0.0.1:80"), w[2].own("10.0.0.1:80")) == (1, 0)
    w[0].dec("10.0.0.1:80")
    w[0].dec("10.0.0.1:80")                # a stray decrement is clamped, never negative
    assert w[2].get("10.0.0.1:80") == 1 and w[0].own("10.0.0.1:80") == 0
    row1 = t.v[t.row:2 * t.row].tolist()
    w[0].inc("10.0.0.3:80")
    assert t.v[t.row:2 * t.row].tolist() == row1   # worker 0 never wrote worker 1's row


def test_a_replaced_workers_row_is_cleared_and_readers_forget_it():
    t = SharedTable(2, slots=64)
    a, b = SharedInflight(t, 0), SharedInflight(t, 1)
    b.inc("10.0.0.1:80")
    assert a.get("10.0.0.1:80") == 1
    gen = t.header(1, GEN)
    t.clear_row(1)                          # worker 1 died with its request
    assert t.header(1, GEN) == gen + 1
    b2 = SharedInflight(t, 1)               # its replacement
    b2.inc("10.0.0.7:80")                   # may reuse the slot the old address had
    assert a.get("10.0.0.1:80") == 0 and a.get("10.0.0.7:80") == 1


def test_a_full_row_counts_locally_instead_of_failing():
    t = SharedTable(1, slots=4)
    w = SharedInflight(t, 0)
    for i in range(6):
        w.inc(f"10.0.0.{i}:80")
    assert all(w.get(f"10.0.0.{i}:80") == 1 for i in range(6))


def test_the_table_is_shared_across_fork():
    t = SharedTable(2, slots=64)
    parent = SharedInflight(t, 0)
    pid = os.fork()
    if pid == 0:
        try:
            child = SharedInflight(t, 1)
            for _ in range(5):
                child.inc("10.0.0.1:80")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    parent.inc("10.0.0.1:80")
    assert parent.get("10.0.0.1:80") == 6 and parent.own("10.0.0.1:80") == 1


def test_the_load_view_takes_the_other_workers_changes_on_sync():
    t = SharedTable(2, slots=64)
    mine, other = SharedInflight(t, 0), SharedInflight(t, 1)
    view = LoadView(mine)
    seen = []
    view.watch(["10.0.0.1:80"], lambda r: seen.append(r.requests))
    ticket = view.begin("10.0.0.1:80")
    assert view.get("10.0.0.1:80").requests == 1
    other.inc("10.0.0.1:80")
    other.inc("10.0.0.1:80")
    assert view.sync() == 1 and view.get("10.0.0.1:80").requests == 3 and seen[-1] == 3
    assert view.sync() == 0                 # nothing changed since
    view.end(ticket)
    assert view.get("10.0.0.1:80").requests == 2 and view.requests("10.0.0.1:80") == 2


@pytest.mark.parametrize("n", [2])
def test_merged_metrics_label_every_sample_with_its_worker(n):
    from prometheus_client import CollectorRegistry, Counter, start_http_server

    servers, ports = [], []
    for i in range(n):
        reg = CollectorRegistry()
        Counter("ai_lb_things", "Things.", ["route"], registry=reg).labels("llm").inc(i + 1)
        srv, _ = start_http_server(0, addr="127.0.0.1", registry=reg)
        servers.append(srv)
        ports.append((i, srv.server_port))
    try:
        text = merged_metrics(ports + [(9, 1)])   # a worker that does not answer is skipped
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
    assert 'ai_lb_things_total{route="llm",worker="0"} 1.0' in text
    assert 'ai_lb_things_total{route="llm",worker="1"} 2.0' in text
    assert text.count("# TYPE ai_lb_things_total counter") == 1   # one family, every worker's samples


def test_a_worker_with_two_more_busy_connections_asks_envoy_to_move_one():
    from types import SimpleNamespace as NS

    from extproc.envoy.forwarding import WorkerLink
    from extproc.server import _even_out
    from extproc.state.shared_inflight import PID

    t = SharedTable(2, slots=8)
    for i in range(2):
        t.set_header(i, PID, 100 + i)

    class Conn:   # what _even_out reads of a transport connection
        def __init__(self, streams):
            self.conn, self.calls, self.moved, self.streams = NS(goaway_sent=False, last_sid=0), {}, False, streams

        def shutdown(self):
            self.moved = True

    conn = Conn

    hot, warm, health = conn(200), conn(50), conn(2)   # the health checker's connection is never "busy"
    gw = NS(worker=WorkerLink(0, 2, t), _h2=NS(connections={hot, warm, health}), _sid_marks={})
    other = NS(worker=WorkerLink(1, 2, t), _h2=NS(connections=set()), _sid_marks={})
    for c in (hot, warm, health):
        c.conn.last_sid = 2 * c.streams
    assert _even_out(other) is False          # worker 1 publishes 0 busy connections
    assert _even_out(gw) is True              # 2 busy vs 0: the less busy of the two moves
    assert warm.moved and not hot.moved and not health.moved
    warm.conn.goaway_sent = True
    for c in (hot, health):
        c.conn.last_sid += 2 * c.streams
    assert _even_out(gw) is False             # 1 vs 0: nothing to gain
