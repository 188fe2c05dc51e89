"""One endpoint's event stream: sequence numbers, gaps, replay, restarts, liveness.

Sans-IO: the socket layer hands ``on_message`` each message and ``on_replay`` the answer
to a replay request; both return the sequence number to replay from when a replay is
needed (the socket layer asks the engine's replay endpoint), else None.

* **In order** (``seq == last + 1``): the batch is applied to the index.
* **A gap** (``seq > last + 1``: the subscriber's queue overflowed, the network dropped
  messages): with a replay endpoint the missing batches are fetched (live messages are
  held meanwhile, at most ``max_pending``) and applied in order; without one, or when the
  replay cannot fill the hole, the endpoint's view is dropped and rebuilt from the
  messages that follow.
* **A restart** (``seq <= last``: the engine's counter starts again from 0): the view is
  cleared (a new engine has an empty cache); what it sent before we noticed is replayed
  when possible. The first message ever heard replays the engine's history from 0 too.
* **A reconnect** that cannot replay clears the view (the engine may have restarted or
  evicted anything meanwhile).

``live(now)`` says whether the view can be trusted for routing: the socket is connected
(where that can be known), something has been heard, no replay is running, a rebuild
is older than ``rebuild_window``, and the engine has not stayed silent through
``stale_requests`` requests that must have stored blocks (events switched off or sent
elsewhere). Otherwise the scorer falls back to the approximate prefix index.
"""

from __future__ import annotations

from typing import Callable

from ...state.kv_block_index import KvBlockIndex
from .wire import Bad, Cleared, Removed, Stored, WireError, decode_payload

DEFAULT_MEDIUMS = ("GPU",)


def _norm(x):
    if isinstance(x, list):
        return tuple(_norm(i) for i in x)
    return x


class EventStream:
    def __init__(self, address: str, index: KvBlockIndex, *, replay: bool = False,
                 mediums: tuple[str, ...] = DEFAULT_MEDIUMS, rebuild_window: float = 10.0,
                 stale_requests: int = 3, max_pending: int = 10_000,
                 clock: Callable[[], float] | None = None) -> None:
        import time

        self.address = address
        self.index = index
        self.view = index.view(address)
        self.replay = replay
        self.mediums = frozenset(mediums)
        self.rebuild_window = rebuild_window
        self.stale_requests = stale_requests
        self.max_pending = max_pending
        self.clock = clock or time.monotonic
        self.last_seq: int | None = None
        self.heard_at: float | None = None
        self.connected: bool | None = None     # None: the socket cannot tell (shared bound socket)
        self.replaying_from: int | None = None
        self.history = False                   # the running replay fetches history (no hole is a loss)
        self.pending: list[tuple[int, bytes]] = []
        self.rebuilding_until = 0.0
        self.missed = 0
        self.dp_rank: int | None = None
        self.counts: dict[str, int] = {}

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    # -- the socket layer's calls ------------------------------------------------------------
    def on_message(self, seq: int, payload: bytes) -> int | None:
        self.heard_at = self.clock()
        self.missed = 0
        self.count("messages")
        if self.replaying_from is not None:
            if len(self.pending) >= self.max_pending:
                self.count("pending_overflow")
                self.replaying_from = None
                self.pending = []
                self._rebuild("pending_overflow")
                self.last_seq = seq
                self._apply(payload)
                return None
            self.pending.append((seq, payload))
            return None
        last = self.last_seq
        if last is None or seq <= last:
            if last is not None:
                self.count("restarts")
                self.index.clear(self.address)
            self.last_seq = seq
            if self.replay and seq > 0:        # the engine's history (or what a new engine sent before we noticed)
                return self._start_replay(0, seq, payload, history=True)
            self._apply(payload)
            return None
        if seq == last + 1:
            self.last_seq = seq
            self._apply(payload)
            return None
        self.count("gaps")
        if self.replay:
            return self._start_replay(last + 1, seq, payload, history=False)
        self._rebuild("gap")
        self.last_seq = seq
        self._apply(payload)
        return None

    def on_replay(self, batches: list[tuple[int, bytes]] | None) -> None:
        """The answer to the running replay (None: it failed or timed out)."""
        start, pending = self.replaying_from, self.pending
        if start is None:
            return
        self.replaying_from, self.pending = None, []
        history = self.history
        top = self.last_seq if self.last_seq is not None and not history else None   # highest seq applied
        expected: int | None = start
        if batches is None:
            self.count("replay_failed")
            if history:
                self.rebuilding_until = self.clock() + self.rebuild_window
            else:
                self._rebuild("replay_failed")
            expected = None
        else:
            self.count("replays")
            for seq, payload in sorted(batches):
                if seq < expected:
                    continue
                if seq != expected:
                    if not (history and expected == start):
                        self.count("replay_short")
                        self._rebuild("replay_short")
                        expected = None
                        break
                    self.rebuilding_until = self.clock() + self.rebuild_window   # older history is gone
                self._apply(payload)
                self.count("replayed")
                top = seq
                expected = seq + 1
        for seq, payload in pending:
            if expected is not None and seq < expected:
                continue
            if expected is not None and seq != expected:
                self.count("gaps")
                self._rebuild("gap")
            self._apply(payload)
            top = seq
            expected = seq + 1
        if top is not None:
            self.last_seq = top

    def on_connected(self) -> int | None:
        """The socket (re)connected. A reconnect replays what was missed, or starts over."""
        was = self.connected
        self.connected = True
        if was is False and self.last_seq is not None:
            self.count("reconnects")
            if self.replay and self.replaying_from is None:
                return self._start_replay(self.last_seq + 1, None, None, history=False)
            if not self.replay:
                self.index.clear(self.address)
                self.last_seq = None           # whatever comes next starts a new history
                self.rebuilding_until = self.clock() + self.rebuild_window
        return None

    def on_disconnected(self) -> None:
        self.connected = False

    def close(self) -> None:
        self.index.drop(self.address)

    # -- what the scorer reads -----------------------------------------------------------------
    def live(self, now: float) -> str | None:
        """None when the view can be trusted, else why not."""
        if self.connected is False:
            return "disconnected"
        if self.heard_at is None:
            return "no_events"
        if self.replaying_from is not None:
            return "replaying"
        if now < self.rebuilding_until:
            return "rebuilding"
        if self.missed >= self.stale_requests:
            return "silent"
        return None

    def request_done(self, picked_at: float) -> None:
        """A request routed here that had blocks to store ended: the engine published
        something since it was picked, or it is silent."""
        if self.heard_at is None or self.heard_at < picked_at:
            self.missed += 1

    # -- applying -----------------------------------------------------------------------------
    def _start_replay(self, start: int, seq: int | None, payload: bytes | None, history: bool) -> int:
        self.replaying_from = start
        self.history = history
        self.pending = [] if payload is None else [(seq, payload)]
        return start

    def _rebuild(self, why: str) -> None:
        self.count("rebuilds")
        self.index.clear(self.address)
        self.rebuilding_until = self.clock() + self.rebuild_window

    def _apply(self, payload: bytes) -> None:
        apply_payload(self, payload)


def apply_payload(st: EventStream, payload: bytes) -> None:
    """Decode one batch and apply its events to the stream's view (bad ones counted, skipped)."""
    try:
        batch = decode_payload(payload)
    except WireError:
        st.count("malformed_messages")
        return
    st.dp_rank = batch.dp_rank
    index, view, mediums = st.index, st.view, st.mediums
    for ev in batch.events:
        kind = type(ev)
        if kind is Stored:
            if ev.medium is not None and ev.medium not in mediums:
                st.count("other_medium")
                continue
            if ev.group_idx:
                st.count("other_group")
                continue
            index.stored(view, ev.hashes, ev.parent, ev.tokens, ev.block_size, _salts(st, ev))
        elif kind is Removed:
            if ev.medium is not None and ev.medium not in mediums:
                continue
            if ev.group_idx:
                continue
            for h in ev.hashes:
                index.removed(view, h)
        elif kind is Cleared:
            if ev.medium is None or ev.medium in mediums:
                st.count("cleared")
                index.clear(st.address)
        elif kind is Bad:
            st.count("malformed_events")

def _salts(st: EventStream, ev: Stored):
    name = ev.lora_name
    if name is None and ev.lora_id is not None:
        name = f"#lora-id:{ev.lora_id}"       # no name to match a request with: its own key space
    elif name is not None:
        st.index.saw_lora(name)
    extra = ev.extra_keys
    if not extra or all(x is None for x in extra):
        return st.index.salt(name)
    out = []
    salt = st.index.salt
    for x in extra:
        if x is None:
            out.append(salt(name))
            continue
        parts = tuple(p for p in _norm(x) if p != ev.lora_name and p != ev.lora_id) \
            if isinstance(x, list) else (_norm(x),)
        out.append(salt(name, parts))
    return out
