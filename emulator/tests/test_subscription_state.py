"""The delivery state machine on its own (no gRPC): invariants under arbitrary interleavings."""

from __future__ import annotations

import itertools
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from emulator import _pb
from emulator.clock import Clock
from emulator.model import DeliveryPolicy, StoredMessage
from emulator.subscription import SubscriptionState

_ids = itertools.count(1)


def _messages(n: int, key: str = "") -> list[StoredMessage]:
    out = []
    for _ in range(n):
        pb = _pb.PubsubMessage(data=b"x", message_id=str(next(_ids)), ordering_key=key)
        out.append(StoredMessage(pb, pb.ByteSize(), 4e9, key))  # publish_wall far in the future
    return out


def _state(**policy: object) -> SubscriptionState:
    # The clock is never started: leases do not expire here, only explicit acks and nacks count.
    return SubscriptionState(
        "projects/p/subscriptions/s", DeliveryPolicy(**policy), Clock(), lambda _s, _e: None
    )


operation = st.one_of(
    st.tuples(st.just("publish"), st.integers(1, 20)),
    st.tuples(st.just("take"), st.integers(0, 2)),
    st.tuples(st.just("ack"), st.integers(0, 10)),
    st.tuples(st.just("nack"), st.integers(0, 10)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(operation, max_size=40), st.integers(1, 8))
def test_no_message_is_lost_and_no_stream_exceeds_its_window(ops, window):
    state = _state()
    streams = [state.open_stream(f"c{i}", window, 0, 10) for i in range(3)]
    published: set[str] = set()
    leased: list[tuple[str, str]] = []  # (ack_id, message_id)
    acked: set[str] = set()
    for op, arg in ops:
        if op == "publish":
            msgs = _messages(arg)
            published |= {m.pb.message_id for m in msgs}
            state.enqueue(msgs)
        elif op == "take":
            batch = state.take(streams[arg], 1 << 30, 0.0) or []
            leased += [(ack_id, msg.message_id) for ack_id, msg, _ in batch]
            assert streams[arg].outstanding <= window
        elif op in ("ack", "nack") and leased:
            chosen, leased = leased[:arg], leased[arg:]
            ids = [a for a, _ in chosen]
            if op == "ack":
                state.acknowledge(ids)
                acked |= {m for _, m in chosen}
            else:
                state.modify_deadline(ids, 0)

    # Drain: whatever is left must still be deliverable exactly to completion.
    state.acknowledge([a for a, _ in leased])
    acked |= {m for _, m in leased}
    while batch := state.take(None, 1000, 0.0):
        state.acknowledge([a for a, _, _ in batch])
        acked |= {msg.message_id for _, msg, _ in batch}
    assert acked == published
    assert state.backlog() == (0, 0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from("abc"), min_size=1, max_size=30), st.data())
def test_ordering_keys_deliver_in_order_with_one_outstanding_per_key(keys, data):
    state = _state(ordered=True)
    sent: dict[str, list[str]] = {}
    for key in keys:
        [msg] = _messages(1, key)
        sent.setdefault(key, []).append(msg.pb.message_id)
        state.enqueue([msg])
    seen: dict[str, list[str]] = {}
    while batch := state.take(None, 1000, 0.0):
        batch_keys = [msg.ordering_key for _, msg, _ in batch]
        assert len(batch_keys) == len(set(batch_keys)), "one outstanding message per key"
        for ack_id, msg, _ in batch:
            if data.draw(st.booleans(), label="nack"):
                state.modify_deadline([ack_id], 0)
            else:
                seen.setdefault(msg.ordering_key, []).append(msg.message_id)
                state.acknowledge([ack_id])
    assert seen == sent


def test_a_stale_ack_id_neither_acks_nor_disturbs_the_current_delivery():
    state = _state()
    state.enqueue(_messages(1))
    [(first, _, _)] = state.take(None, 1, 0.0)
    state.modify_deadline([first], 0)
    [(second, _, attempt)] = state.take(None, 1, 0.0)

    state.acknowledge([first])

    assert attempt == 2
    assert state.backlog() == (0, 1)
    state.acknowledge([second])
    assert state.backlog() == (0, 0)


def test_messages_older_than_the_retention_are_dropped_not_delivered():
    state = _state(retention=600.0)
    [old] = _messages(1)
    state.enqueue([StoredMessage(old.pb, old.size, time.time() - 601, "")])
    state.enqueue(_messages(1))
    assert state.backlog() == (2, 0)

    state.purge_expired()

    assert state.backlog() == (1, 0)
    [(_, msg, _)] = state.take(None, 10, 0.0)
    assert msg.message_id != old.pb.message_id
