"""Event counters of the state stores (Redis errors, local fallbacks, resyncs), exported
by telemetry as ``ai_lb_state_events_total{store,event}``."""

from __future__ import annotations

events: dict[tuple[str, str], int] = {}


def count(store: str, event: str) -> None:
    k = (store, event)
    events[k] = events.get(k, 0) + 1
