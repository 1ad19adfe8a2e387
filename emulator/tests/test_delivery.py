"""Delivery semantics observed through the real google-cloud-pubsub client."""

from __future__ import annotations

import time
from collections import defaultdict

import grpc
import pytest
from google.cloud import pubsub_v1
from google.pubsub_v1.services.subscriber.transports.grpc import SubscriberGrpcTransport

from emulator.testing import wait_until
from emulator.tests.helpers import Collector, publish_all

# Pull(return_immediately=True) is deprecated but still the plain way to ask "is anything there?".
pytestmark = pytest.mark.filterwarnings("ignore:The return_immediately flag:DeprecationWarning")


def test_published_messages_reach_a_streaming_subscriber_once_each(
    publisher, topic, make_subscription, subscribe
):
    sub = make_subscription()
    sent = [f"m{i}".encode() for i in range(20)]
    ids = publish_all(publisher, topic, *sent, origin="test")

    got = Collector()
    subscribe(sub, got)

    assert wait_until(lambda: got.distinct() == set(sent), timeout=5)
    assert sorted(int(i) for i in ids) == [int(i) for i in ids], "ids increase in publish order"
    assert len(set(ids)) == len(ids)
    assert all(r.attributes == {"origin": "test"} for r in got.received)
    assert all(r.delivery_attempt is None for r in got.received), "no dead-letter policy"


def test_a_subscription_only_gets_messages_published_after_it_was_created(
    publisher, subscriber, topic, make_subscription
):
    publish_all(publisher, topic, b"before")
    sub = make_subscription()
    publish_all(publisher, topic, b"after")

    resp = subscriber.pull(subscription=sub, max_messages=10, timeout=10)

    assert [m.message.data for m in resp.received_messages] == [b"after"]


def test_every_subscription_of_a_topic_gets_its_own_copy(
    publisher, subscriber, topic, make_subscription
):
    first, second = make_subscription(), make_subscription()
    publish_all(publisher, topic, b"fan-out")

    for sub in (first, second):
        resp = subscriber.pull(subscription=sub, max_messages=10, timeout=10)
        assert [m.message.data for m in resp.received_messages] == [b"fan-out"]


def test_a_nacked_message_is_redelivered(publisher, topic, make_subscription, subscribe):
    sub = make_subscription()
    publish_all(publisher, topic, b"again")
    got = Collector(decide=lambda r: "nack" if len(got.received) == 1 else "ack")

    subscribe(sub, got)

    assert wait_until(lambda: len(got.received) >= 2, timeout=5)
    assert got.datas()[:2] == [b"again", b"again"]


def test_a_message_comes_back_when_its_lease_expires(
    publisher, subscriber, topic, make_subscription
):
    sub = make_subscription()
    publish_all(publisher, topic, b"lease")
    first = subscriber.pull(subscription=sub, max_messages=1, timeout=10).received_messages[0]
    subscriber.modify_ack_deadline(subscription=sub, ack_ids=[first.ack_id], ack_deadline_seconds=1)
    started = time.monotonic()

    again = subscriber.pull(subscription=sub, max_messages=1, timeout=10).received_messages

    assert [m.message.data for m in again] == [b"lease"]
    assert again[0].ack_id != first.ack_id
    assert time.monotonic() - started >= 0.9


def test_modifying_the_ack_deadline_extends_the_lease(
    publisher, subscriber, topic, make_subscription
):
    sub = make_subscription()
    publish_all(publisher, topic, b"extended")
    first = subscriber.pull(subscription=sub, max_messages=1, timeout=10).received_messages[0]
    subscriber.modify_ack_deadline(subscription=sub, ack_ids=[first.ack_id], ack_deadline_seconds=1)
    subscriber.modify_ack_deadline(subscription=sub, ack_ids=[first.ack_id], ack_deadline_seconds=3)
    started = time.monotonic()

    # The 1 s lease was replaced by a 3 s one: a long-poll ends empty after ~3 s, or the message
    # returns no earlier than 3 s after the extension.
    again = subscriber.pull(subscription=sub, max_messages=1, timeout=10).received_messages
    if not again:
        again = subscriber.pull(subscription=sub, max_messages=1, timeout=10).received_messages

    assert [m.message.data for m in again] == [b"extended"]
    assert time.monotonic() - started >= 2.9


def test_an_ack_id_from_an_earlier_delivery_is_ignored(
    publisher, subscriber, topic, make_subscription
):
    sub = make_subscription()
    publish_all(publisher, topic, b"stale")
    first = subscriber.pull(subscription=sub, max_messages=1, timeout=10).received_messages[0]
    subscriber.modify_ack_deadline(subscription=sub, ack_ids=[first.ack_id], ack_deadline_seconds=0)
    second = subscriber.pull(subscription=sub, max_messages=1, timeout=10).received_messages[0]

    subscriber.acknowledge(subscription=sub, ack_ids=[first.ack_id])  # stale: must not count
    subscriber.modify_ack_deadline(
        subscription=sub, ack_ids=[second.ack_id], ack_deadline_seconds=0
    )

    third = subscriber.pull(subscription=sub, max_messages=1, timeout=10).received_messages
    assert [m.message.data for m in third] == [b"stale"]
    assert len({first.ack_id, second.ack_id, third[0].ack_id}) == 3


def test_an_acked_message_is_not_redelivered(publisher, subscriber, topic, make_subscription):
    sub = make_subscription()
    publish_all(publisher, topic, b"done")
    first = subscriber.pull(subscription=sub, max_messages=1, timeout=10).received_messages[0]
    subscriber.acknowledge(subscription=sub, ack_ids=[first.ack_id])
    subscriber.modify_ack_deadline(subscription=sub, ack_ids=[first.ack_id], ack_deadline_seconds=0)

    resp = subscriber.pull(subscription=sub, max_messages=1, return_immediately=True, timeout=10)

    assert list(resp.received_messages) == []


def test_pull_waits_a_bounded_time_then_answers_empty(subscriber, make_subscription):
    sub = make_subscription()
    started = time.monotonic()

    resp = subscriber.pull(subscription=sub, max_messages=1, timeout=30)

    assert list(resp.received_messages) == []
    assert 1.0 <= time.monotonic() - started <= 10.0


def test_two_subscribers_share_the_messages_of_one_subscription(
    emulator, emulator_env, publisher, topic, make_subscription, subscribe
):
    sub = make_subscription()
    other_client = pubsub_v1.SubscriberClient()
    first, second = Collector(), Collector()
    subscribe(sub, first)
    other = other_client.subscribe(sub, second)
    try:
        state = emulator.broker.subscription(sub)
        assert wait_until(lambda: state.stream_count() == 2, timeout=5)
        sent = {f"s{i}".encode() for i in range(40)}
        publish_all(publisher, topic, *sent)

        assert wait_until(lambda: first.distinct() | second.distinct() == sent, timeout=5)
        assert first.received, "both streams got a share"
        assert second.received, "both streams got a share"
        assert not first.distinct() & second.distinct(), "acked messages go to one stream only"
    finally:
        other.cancel()
        other_client.close()


def test_a_slow_trickle_is_spread_over_every_open_stream(
    emulator, emulator_env, publisher, topic, make_subscription
):
    # Given 8 streams from 4 subscriber clients (as 4 processors with STREAMS=2 open them)
    sub = make_subscription()
    clients = [pubsub_v1.SubscriberClient() for _ in range(4)]
    streams = [Collector() for _ in range(8)]
    futures = [clients[i // 2].subscribe(sub, got) for i, got in enumerate(streams)]
    try:
        state = emulator.broker.subscription(sub)
        assert wait_until(lambda: state.stream_count() == 8, timeout=10)

        # When 40 messages arrive one at a time, each after the previous one was delivered
        for i in range(40):
            publish_all(publisher, topic, f"t{i}".encode())
            assert wait_until(lambda n=i + 1: sum(len(s.received) for s in streams) >= n)

        # Then every stream got a fair share: 5 each in turn (3 leaves room for a reconnect)
        counts = [len(s.distinct()) for s in streams]
        assert sum(counts) == 40
        assert min(counts) >= 3, f"messages per stream: {counts}"
    finally:
        for future in futures:
            future.cancel()
        for client in clients:
            client.close()


def test_the_emulator_never_has_more_outstanding_than_the_stream_allows(
    emulator, publisher, topic, make_subscription, subscribe
):
    sub = make_subscription()
    publish_all(publisher, topic, *[f"f{i}".encode() for i in range(10)])
    got = Collector(decide=lambda _r: "hold")

    subscribe(sub, got, flow_control=pubsub_v1.types.FlowControl(max_messages=3))

    state = emulator.broker.subscription(sub)
    assert wait_until(lambda: state.backlog() == (7, 3), timeout=5)
    time.sleep(0.3)  # a window in which a flow-control violation would show
    assert state.backlog() == (7, 3)
    assert len(got.received) == 3


def test_a_message_near_the_10_mb_limit_is_delivered_intact(
    emulator, publisher, topic, make_subscription
):
    # Through PUBSUB_EMULATOR_HOST the client's channel keeps gRPC's 4 MiB receive limit, so a
    # consumer of big messages needs its own channel; publishing needs nothing special.
    sub = make_subscription()
    big = bytes(range(256)) * (9 * 1024 * 1024 // 256)
    publish_all(publisher, topic, big)
    channel = grpc.insecure_channel(
        emulator.address, options=[("grpc.max_receive_message_length", 20 * 1024 * 1024)]
    )
    client = pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))
    got = Collector()
    future = client.subscribe(sub, got)
    try:
        assert wait_until(lambda: len(got.received) >= 1, timeout=15)
        assert got.received[0].data == big
    finally:
        future.cancel()
        client.close()


def test_messages_with_an_ordering_key_arrive_in_publish_order(
    ordered_publisher, topic, make_subscription, subscribe
):
    sub = make_subscription(enable_message_ordering=True)
    for i in range(15):
        for key in ("a", "b", "c"):
            ordered_publisher.publish(topic, f"{key}{i}".encode(), ordering_key=key)
    got = Collector()

    subscribe(sub, got)

    assert wait_until(lambda: len(got.distinct()) == 45, timeout=10)
    by_key: defaultdict[str, list[bytes]] = defaultdict(list)
    for r in got.received:
        by_key[r.ordering_key].append(r.data)
    assert by_key == {k: [f"{k}{i}".encode() for i in range(15)] for k in "abc"}


def test_only_one_message_per_ordering_key_is_outstanding(
    ordered_publisher, subscriber, topic, make_subscription
):
    sub = make_subscription(enable_message_ordering=True)
    for data in (b"k1", b"k2", b"k3"):
        ordered_publisher.publish(topic, data, ordering_key="key").result(timeout=10)
    ordered_publisher.publish(topic, b"other", ordering_key="other").result(timeout=10)

    first = subscriber.pull(subscription=sub, max_messages=10, timeout=10).received_messages
    assert sorted(m.message.data for m in first) == [b"k1", b"other"]
    k1 = next(m for m in first if m.message.data == b"k1")
    subscriber.modify_ack_deadline(subscription=sub, ack_ids=[k1.ack_id], ack_deadline_seconds=0)
    again = subscriber.pull(subscription=sub, max_messages=10, timeout=10).received_messages
    assert [m.message.data for m in again] == [b"k1"], "a nacked message keeps its place"
    subscriber.acknowledge(subscription=sub, ack_ids=[again[0].ack_id])
    then = subscriber.pull(subscription=sub, max_messages=10, timeout=10).received_messages
    assert [m.message.data for m in then] == [b"k2"]
