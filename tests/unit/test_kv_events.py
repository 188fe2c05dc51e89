"""vLLM's KV-cache events: the wire format against the real capture, the index keyed by
ai-lb from token ids, and one endpoint's stream (gaps, replay, restarts, liveness)."""

from __future__ import annotations

import tracemalloc

import msgpack
import pytest

from kv_fixture import CLEARED, frames, payload, raw_messages, removed, stored
from extproc.signals.kv_events.stream import EventStream
from extproc.signals.kv_events.wire import (Bad, Cleared, Removed, Stored, WireError, decode_payload, event,
                                            split_frames)
from extproc.state.kv_block_index import KvBlockIndex, chain_keys

BS = 4


# -- wire format -------------------------------------------------------------------------------
def test_the_real_capture_decodes_field_by_field():
    msgs = raw_messages()
    assert len(msgs) == 5
    m0 = split_frames(msgs[0][0])
    assert (m0.topic, m0.seq) == (b"kv@127.0.0.1:18000@tiny", 14)
    b = decode_payload(m0.payload)
    assert b.dp_rank == 0 and b.ts == pytest.approx(1796172451.2880688)
    assert isinstance(b.events[0], Cleared)
    s = b.events[1]
    assert isinstance(s, Stored) and s.parent is None and s.block_size == 32 and s.medium == "GPU"
    assert len(s.hashes) == 19 and len(s.tokens) == 19 * 32 and s.hashes[0] == 17789367361005891757
    assert s.lora_id is None and s.lora_name is None and s.extra_keys == [None] * 19 and s.group_idx == 0
    b1 = decode_payload(split_frames(msgs[1][0]).payload)     # request B extends A's chain
    assert b1.events[0].parent == s.hashes[-1] == 3130481842003844428 and len(b1.events[0].hashes) == 2
    b9 = decode_payload(split_frames(msgs[2][0]).payload)     # evictions: one hash per BlockRemoved
    rem = [e for e in b9.events if isinstance(e, Removed)]
    assert len(rem) == 15 and all(len(e.hashes) == 1 for e in rem) and rem[0].hashes == [5468117903722885808]
    assert split_frames(msgs[4][0]).seq == 26 and decode_payload(msgs[4][0][2]).events == [Cleared()]


def test_payloads_built_as_vllm_builds_them_are_byte_identical_to_the_capture():
    """msgpack of the decoded maps, keys in vLLM's order, reproduces every captured payload:
    the helpers the other tests build messages with produce exactly vLLM's bytes."""
    for (topic, seq, raw), decoded in raw_messages():
        assert msgpack.packb(decoded, use_bin_type=True) == raw
        ev = decoded[1][-1]
        if ev["type"] == "BlockStored":
            built = stored(ev["block_hashes"], ev["token_ids"], ev["parent_block_hash"], 32)
            assert msgpack.packb(built, use_bin_type=True) in raw


def test_older_array_like_events_and_bad_input_are_read_or_refused_never_raised():
    s = event(["BlockStored", [1, 2], None, list(range(8)), 4, None, "GPU"])
    assert isinstance(s, Stored) and s.hashes == [1, 2] and s.lora_name is None
    assert event(["BlockRemoved", [7], "GPU"]) == Removed([7], "GPU", None)
    assert event(["AllBlocksCleared"]) == Cleared()
    for bad in (None, 3, {}, {"type": "Nope"}, {"type": "BlockStored", "block_hashes": [1], "token_ids": [1],
                                                "block_size": 4},   # 1 token for a 4-token block
                {"type": "BlockStored", "block_hashes": "x", "token_ids": [], "block_size": 4},
                {"type": "BlockRemoved", "block_hashes": []}, ["BlockStored", [1]]):
        assert isinstance(event(bad), Bad), bad
    for p in (b"", b"\xc1", msgpack.packb({"a": 1}), msgpack.packb([1.0, 5, 0])):
        with pytest.raises(WireError):
            decode_payload(p)
    with pytest.raises(WireError):
        split_frames([b"t", b"\x00" * 7, b""])
    with pytest.raises(WireError):
        split_frames([b"t", b""])


# -- index -------------------------------------------------------------------------------------
def toks(*words: int) -> list[int]:
    return [w for w in words for _ in range(BS)]   # one block per word


def test_keys_come_from_token_ids_so_two_engines_with_different_hash_seeds_agree():
    idx = KvBlockIndex()
    a, b = idx.view("a"), idx.view("b")
    idx.stored(a, [11, 12, 13], None, toks(1, 2, 3), BS)
    idx.stored(b, [91, 92], None, toks(1, 2), BS)      # same tokens, another seed's hashes
    q = chain_keys(toks(1, 2, 3, 4), BS)
    assert idx.depths(q, ["a", "b", "c"]) == {"a": 3, "b": 2, "c": 0}
    assert idx.depths(chain_keys(toks(9, 2, 3), BS), ["a", "b"]) == {"a": 0, "b": 0}   # chained: block 0 differs
    assert len(idx) == 3 and idx.total == 5


def test_a_stored_event_continues_its_parent_chain_and_removal_takes_vllm_hashes():
    idx = KvBlockIndex()
    a = idx.view("a")
    idx.stored(a, [11, 12], None, toks(1, 2), BS)
    idx.stored(a, [13], 12, toks(3), BS)                 # BlockStored with parent_block_hash
    assert idx.depths(chain_keys(toks(1, 2, 3), BS), ["a"]) == {"a": 3}
    assert idx.removed(a, 12)
    assert idx.depths(chain_keys(toks(1, 2, 3), BS), ["a"]) == {"a": 1}   # a hit stops at the first hole
    assert not idx.removed(a, 999) and idx.counts["unknown_removed"] == 1
    assert idx.stored(a, [20], 555, toks(4), BS) == 0 and idx.counts["orphan"] == 1   # parent never seen


def test_a_block_cached_twice_survives_one_removal():
    idx = KvBlockIndex()
    a = idx.view("a")
    idx.stored(a, [11], None, toks(1), BS)
    idx.stored(a, [11], None, toks(1), BS)     # vLLM caches a block computed concurrently twice
    idx.removed(a, 11)
    assert idx.depths(chain_keys(toks(1), BS), ["a"]) == {"a": 1}
    idx.removed(a, 11)
    assert idx.depths(chain_keys(toks(1), BS), ["a"]) == {"a": 0}


def test_lora_adapters_and_extra_keys_never_share_blocks():
    idx = KvBlockIndex()
    a = idx.view("a")
    base, lora = idx.salt(None), idx.salt("sql-lora")
    idx.stored(a, [1, 2], None, toks(1, 2), BS, lora)
    assert idx.depths(chain_keys(toks(1, 2), BS, base), ["a"]) == {"a": 0}
    assert idx.depths(chain_keys(toks(1, 2), BS, lora), ["a"]) == {"a": 2}
    assert idx.depths(chain_keys(toks(1, 2), BS, idx.salt("other")), ["a"]) == {"a": 0}
    salted = idx.salt(None, ("tenant-1",))          # vLLM's cache_salt, on block 0 only
    idx.stored(a, [5, 6], None, toks(1, 2), BS, [salted, base])
    assert idx.depths(chain_keys(toks(1, 2), BS, base, first_salt=salted), ["a"]) == {"a": 2}
    assert idx.depths(chain_keys(toks(1, 2), BS, base), ["a"]) == {"a": 0}


def test_clear_and_drop_forget_one_endpoint_and_reuse_its_slot():
    idx = KvBlockIndex()
    a, b = idx.view("a"), idx.view("b")
    idx.stored(a, [1, 2], None, toks(1, 2), BS)
    idx.stored(b, [1, 2], None, toks(1, 2), BS)
    assert idx.clear("a") == 2
    assert idx.depths(chain_keys(toks(1, 2), BS), ["a", "b"]) == {"a": 0, "b": 2}
    idx.drop("b")
    assert len(idx) == 0 and idx.total == 0 and idx.get("b") is None
    assert idx.view("c").slot == b.slot             # the lowest free slot again: bitmasks stay small


def test_bounds_forget_the_storing_endpoints_oldest_blocks_first():
    idx = KvBlockIndex(max_blocks=10, max_blocks_per_endpoint=6)
    a, b = idx.view("a"), idx.view("b")
    idx.stored(a, list(range(100, 108)), None, toks(*range(8)), BS)
    assert len(a) == 6 and idx.counts["overflow"] == 2 and 100 not in a.blocks and 107 in a.blocks
    idx.stored(b, list(range(200, 206)), None, toks(*range(6)), BS)
    assert idx.total == 10 and len(b) == 4 and len(a) == 6     # the total bound: b's own oldest went
    assert len(idx) <= 10


def test_memory_per_million_blocks_is_bounded():
    """~19 ms of CPU per 50k blocks; the number for docs/benchmarks.md comes from
    aibench/kv_index_bench.py. Here: well under 400 bytes per block (two dicts)."""
    idx = KvBlockIndex()
    v = idx.view("a")
    tokens = list(range(16 * 50_000))
    tracemalloc.start()
    idx.stored(v, list(range(1 << 40, (1 << 40) + 50_000)), None, tokens, 16)
    cur, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert idx.total == 50_000
    assert cur / 50_000 < 400, cur / 50_000


# -- one endpoint's stream -----------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def stream(replay=False, **kw):
    idx = KvBlockIndex()
    clock = Clock()
    return EventStream("a", idx, replay=replay, clock=clock, **kw), idx, clock


def depth(idx, *words):
    return idx.depths(chain_keys(toks(*words), BS), ["a"])["a"]


def msg(st, seq, *events):
    return st.on_message(seq, payload(list(events)))


def test_stores_evictions_and_a_reset_in_order_reproduce_the_engine_cache():
    st, idx, clock = stream()
    assert st.live(clock()) == "no_events"
    assert msg(st, 0, stored([1, 2, 3], toks(1, 2, 3), block_size=BS)) is None
    assert msg(st, 1, removed(3), stored([4], toks(9), parent=2, block_size=BS)) is None
    assert depth(idx, 1, 2, 3) == 2 and depth(idx, 1, 2, 9) == 3 and st.live(clock()) is None
    msg(st, 2, CLEARED)
    assert depth(idx, 1, 2) == 0 and st.counts["cleared"] == 1


def test_a_gap_without_replay_drops_the_view_and_rebuilds_it():
    st, idx, clock = stream()
    msg(st, 0, stored([1, 2], toks(1, 2), block_size=BS))
    msg(st, 5, stored([7], toks(5), block_size=BS))          # 1..4 lost: evictions may be among them
    assert depth(idx, 1, 2) == 0 and depth(idx, 5) == 1
    assert st.counts["gaps"] == 1 and st.live(clock()) == "rebuilding"
    clock.t += st.rebuild_window + 0.1
    assert st.live(clock()) is None and st.last_seq == 5


def test_a_gap_with_replay_fills_the_hole_in_order_and_holds_live_messages_meanwhile():
    st, idx, clock = stream(replay=True)
    msg(st, 0, stored([1], toks(1), block_size=BS))
    assert msg(st, 3, stored([4], toks(4), parent=3, block_size=BS)) == 1      # replay from 1, please
    assert st.live(clock()) == "replaying"
    assert msg(st, 4, removed(1)) is None                                      # held, not applied yet
    assert depth(idx, 1) == 1
    st.on_replay([(1, payload([stored([2], toks(2), parent=1, block_size=BS)])),
                  (2, payload([stored([3], toks(3), parent=2, block_size=BS)])),
                  (3, payload([stored([4], toks(4), parent=3, block_size=BS)]))])   # overlaps what is held
    assert st.last_seq == 4 and st.live(clock()) is None and st.counts["replayed"] == 3
    assert depth(idx, 1, 2, 3, 4) == 0                         # block 1 removed last, in order
    assert len(st.view) == 3


def test_a_replay_that_cannot_fill_the_hole_or_fails_rebuilds():
    st, idx, clock = stream(replay=True)
    msg(st, 0, stored([1], toks(1), block_size=BS))
    msg(st, 9, stored([7], toks(7), block_size=BS))
    st.on_replay([(5, payload([]))])                           # the engine's buffer starts after the hole
    assert st.counts["replay_short"] == 1 and depth(idx, 1) == 0 and depth(idx, 7) == 1
    assert st.last_seq == 9 and st.live(clock()) == "rebuilding"
    msg(st, 12, stored([8], toks(8), block_size=BS))
    st.on_replay(None)
    assert st.counts["replay_failed"] == 1 and depth(idx, 7) == 0 and depth(idx, 8) == 1


def test_a_restart_clears_the_view_and_replays_what_the_new_engine_sent_before():
    st, idx, clock = stream(replay=True)
    msg(st, 0, stored([1], toks(1), block_size=BS))
    msg(st, 1, stored([2], toks(2), block_size=BS))
    assert msg(st, 2, stored([5], toks(5), block_size=BS)) is None
    assert msg(st, 1, stored([9], toks(9), block_size=BS)) == 0      # the counter went back: a new engine
    assert st.counts["restarts"] == 1 and depth(idx, 1) == 0 and depth(idx, 5) == 0
    st.on_replay([(0, payload([stored([8], toks(8), block_size=BS)])),
                  (1, payload([stored([9], toks(9), block_size=BS)]))])
    assert depth(idx, 8) == 1 and depth(idx, 9) == 1 and st.last_seq == 1


def test_the_first_message_replays_the_engines_history_when_it_can():
    st, idx, clock = stream(replay=True)
    assert msg(st, 40, stored([3], toks(3), parent=2, block_size=BS)) == 0
    st.on_replay([(38, payload([stored([1, 2], toks(1, 2), block_size=BS)])), (39, payload([])),
                  (40, payload([stored([3], toks(3), parent=2, block_size=BS)]))])
    assert depth(idx, 1, 2, 3) == 3 and st.last_seq == 40
    assert st.live(clock()) == "rebuilding"      # the buffer began at 38: older blocks are unknown


def test_a_reconnect_that_cannot_replay_starts_over_and_a_silent_engine_is_not_trusted():
    st, idx, clock = stream()
    st.on_connected()
    msg(st, 0, stored([1], toks(1), block_size=BS))
    st.on_disconnected()
    assert st.live(clock()) == "disconnected"
    assert st.on_connected() is None and depth(idx, 1) == 0 and st.last_seq is None
    clock.t += 100
    msg(st, 7, stored([2], toks(2), block_size=BS))
    assert st.live(clock()) is None
    for _ in range(3):                     # three requests that must have stored blocks, nothing heard
        clock.t += 1
        st.request_done(clock.t - 0.5)
    assert st.live(clock()) == "silent"
    msg(st, 8, removed(2))
    assert st.live(clock()) is None


def test_malformed_messages_and_events_are_counted_and_skipped():
    st, idx, clock = stream()
    st.on_message(0, b"\xc1garbage")
    msg(st, 1, {"type": "BlockStored", "block_hashes": [1]}, stored([2], toks(2), block_size=BS),
        stored([3], toks(3), block_size=BS, medium="CPU"))
    assert st.counts["malformed_messages"] == 1 and st.counts["malformed_events"] == 1
    assert st.counts["other_medium"] == 1 and depth(idx, 2) == 1 and depth(idx, 3) == 0


def test_the_captured_stream_applied_in_order():
    """The capture's raw messages of server 18000 (seq 14, 15, 23, 26): store A, extend
    with B, a gap (16..22 were not captured raw), the reset."""
    msgs = [m for m in raw_messages() if m[0][0].endswith(b"18000@tiny")]
    st, idx, clock = stream()
    for fr, _ in msgs[:2]:
        m = split_frames(fr)
        st.on_message(m.seq, m.payload)
    v = idx.get("a")
    assert len(v) == 21 and v.block_size == 32
    tokens_a = msgs[0][1][1][1]["token_ids"]
    tokens_b = tokens_a + msgs[1][1][1][0]["token_ids"]
    assert idx.depths(chain_keys(tokens_b, 32), ["a"])["a"] == 21
    m = split_frames(msgs[2][0][:])
    st.on_message(m.seq, m.payload)
    assert st.counts["gaps"] == 1
    m = split_frames(msgs[3][0])
    st.on_message(m.seq, m.payload)
    assert len(idx.get("a")) == 0 and st.counts["cleared"] == 2


# -- one bound port for the whole fleet ------------------------------------------------------------
def test_a_shared_bound_port_attributes_messages_by_topic_or_peer_address():
    from extproc.signals.kv_events import KvEventsHub, KvEventsSpec

    hub = KvEventsHub(KvEventsSpec(endpoint="tcp://0.0.0.0:5557", topic="kv@{host}:{port}"))
    hub.want("route", ["10.0.0.1:8000", "10.0.0.2:8000"])   # no event loop: nothing is bound here
    (key,) = hub._sockets
    assert key == ("tcp://0.0.0.0:5557", True)               # one bound socket for both
    hub._on_frames(key, frames(0, [stored([1], toks(1), block_size=BS)], b"kv@10.0.0.2:8000"), "10.0.0.9")
    hub._on_frames(key, frames(0, [stored([2], toks(2), block_size=BS)], b"kv@10.0.0.7:8000"), "10.0.0.1")
    assert len(hub.index.get("10.0.0.2:8000")) == 1 and len(hub.index.get("10.0.0.1:8000")) == 0
    assert hub.counts["unattributed"] == 1                    # a topic nobody has: dropped, counted
    assert hub.streams["10.0.0.1:8000"].connected is None     # a shared socket cannot tell who is up

    by_peer = KvEventsHub(KvEventsSpec(endpoint="tcp://0.0.0.0:5557"))
    by_peer.want("route", ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.2:8001"])
    (key,) = by_peer._sockets
    by_peer._on_frames(key, frames(0, [stored([1], toks(1), block_size=BS)]), "10.0.0.1")
    by_peer._on_frames(key, frames(0, [stored([2], toks(2), block_size=BS)]), "10.0.0.2")   # two servers there
    assert len(by_peer.index.get("10.0.0.1:8000")) == 1 and by_peer.counts["unattributed"] == 1
    by_peer._on_frames(key, [b"only", b"two"], "10.0.0.1")
    assert by_peer.counts["malformed_frames"] == 1
    by_peer.release("route")
    assert not by_peer.streams and not by_peer._sockets and by_peer.index.get("10.0.0.1:8000") is None


def test_a_reconnect_with_replay_asks_for_what_was_missed_and_keeps_the_view_if_it_comes():
    st, idx, clock = stream(replay=True)
    st.on_connected()
    msg(st, 0, stored([1], toks(1), block_size=BS))
    st.on_disconnected()
    assert st.on_connected() == 1                                   # replay from the next sequence number
    st.on_replay([(1, payload([stored([2], toks(2), parent=1, block_size=BS)]))])
    assert depth(idx, 1, 2) == 2 and st.last_seq == 1 and st.live(clock()) is None


def test_the_hub_follows_discovery_and_drops_a_backend_that_left():
    from extproc.signals.kv_events import KvEventsHub, KvEventsSpec

    hub = KvEventsHub(KvEventsSpec(endpoint="tcp://{host}:{port+1}"))
    hub.want("route a", ["10.0.0.1:8000", "10.0.0.2:8000"])
    hub.want("route b", ["10.0.0.2:8000"])
    assert set(hub._sockets) == {("tcp://10.0.0.1:8001", False), ("tcp://10.0.0.2:8001", False)}
    hub.streams["10.0.0.1:8000"].on_message(0, payload([stored([1], toks(1), block_size=BS)]))
    hub.want("route a", ["10.0.0.2:8000"])                          # 10.0.0.1 left the fleet
    assert set(hub.streams) == {"10.0.0.2:8000"} and hub.index.get("10.0.0.1:8000") is None
    assert len(hub.index) == 0 and hub.stats()["messages"] == 1     # its counts stay counted
    hub.release("route a")
    assert set(hub.streams) == {"10.0.0.2:8000"}                    # route b still reads it
    hub.release("route b")
    assert not hub.streams and not hub._sockets
