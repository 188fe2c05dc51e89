"""State that grows per request must stay bounded when nothing else drains it.

Found by the body fuzz run (docs/reliability.md): over 200k requests on a prefix_cache route
ai-lb's RSS grew linearly, ~75 bytes per request; tracemalloc put it on
``extproc.signals.load.LoadView.begin``: every routed request appends a ``Ticket`` to
its endpoint's ``pending`` deque, and only ``on_scrape`` removes them, so on a route whose
endpoints are never scraped (every policy but the metric-reading ones) they pile up for
ever, ended or not. Fixed in ``LoadView.end``: a ticket that ends leaves the deque then.
"""

from __future__ import annotations

from extproc.signals import LoadView


def test_ended_requests_leave_nothing_behind_without_scrapes():
    load = LoadView()
    for _ in range(10_000):
        load.end(load.begin("10.0.0.1:8000", tokens=100))
    rec = load.get("10.0.0.1:8000")
    assert rec.requests == 0 and rec.assumed_requests == 0
    assert len(rec.pending) == 0


def test_a_long_request_at_the_head_does_not_hold_ended_ones_behind_it():
    load = LoadView()
    long = load.begin("10.0.0.1:8000", tokens=100)
    for _ in range(10_000):
        load.end(load.begin("10.0.0.1:8000", tokens=100))
    rec = load.get("10.0.0.1:8000")
    assert rec.requests == 1 and rec.assumed_requests == 1 and rec.assumed_tokens == 100
    assert len(rec.pending) <= 2 * rec.requests + 65
    load.end(long)
    assert len(rec.pending) == 0 and rec.assumed_requests == 0
