"""Subscriber churn: killed processes, dropped streams, injected faults, shutdown."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import grpc
import pytest
from google.api_core import exceptions
from google.cloud import pubsub_v1

from emulator import Emulator, _pb
from emulator.testing import wait_until
from emulator.tests.helpers import Collector, publish_all, unique


def _start_child(address: str, subscription: str) -> tuple[subprocess.Popen[str], list[str]]:
    env = {**os.environ, "PUBSUB_EMULATOR_HOST": address}
    child = subprocess.Popen(
        [sys.executable, "-m", "emulator.tests.subscriber_child", subscription],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: list[str] = []
    assert child.stdout is not None
    threading.Thread(
        target=lambda: lines.extend(line.strip() for line in child.stdout),
        daemon=True,
        name="child-stdout",
    ).start()
    return child, lines


def test_after_a_subscriber_is_sigkilled_its_replacement_gets_new_then_held_messages(
    emulator, publisher, topic, make_subscription, subscribe
):
    # Given a subscriber process holding (never acking) a message
    sub = make_subscription()
    child, lines = _start_child(emulator.address, sub)
    try:
        state = emulator.broker.subscription(sub)
        assert wait_until(lambda: state.stream_count() == 1, timeout=15)
        publish_all(publisher, topic, b"held-by-child")
        assert wait_until(lambda: "held-by-child" in lines, timeout=5)
    finally:
        # When it is SIGKILLed
        child.kill()
        child.wait()
    killed_at = time.monotonic()
    assert wait_until(lambda: state.stream_count() == 0, timeout=5), "dead stream forgotten"

    # Then its replacement gets new messages at once, and the held one after its lease
    replacement = Collector()
    subscribe(sub, replacement)
    publish_all(publisher, topic, b"fresh")
    assert wait_until(lambda: b"fresh" in replacement.datas(), timeout=2)
    assert wait_until(lambda: b"held-by-child" in replacement.datas(), timeout=20)
    held_back_at = next(r.at for r in replacement.received if r.data == b"held-by-child")
    assert held_back_at - killed_at > 1.0, "it waited for the lease, not for the stream to close"


def test_dropped_streams_are_reopened_by_the_client_with_nothing_lost(
    emulator, publisher, topic, make_subscription, subscribe
):
    sub = make_subscription()
    got = Collector()
    subscribe(sub, got)
    state = emulator.broker.subscription(sub)
    first = {f"before-{i}".encode() for i in range(10)}
    publish_all(publisher, topic, *first)
    assert wait_until(lambda: got.distinct() >= first, timeout=5)

    emulator.drop_streams()
    second = {f"after-{i}".encode() for i in range(10)}
    publish_all(publisher, topic, *second)

    assert wait_until(lambda: got.distinct() == first | second, timeout=15)
    assert wait_until(lambda: state.stream_count() == 1, timeout=5)


def test_the_client_reopens_a_streaming_pull_refused_by_injected_faults(
    emulator, publisher, topic, make_subscription, subscribe
):
    sub = make_subscription()
    emulator.faults.fail_next("StreamingPull", n=2, code=grpc.StatusCode.UNAVAILABLE)
    got = Collector()

    subscribe(sub, got)
    publish_all(publisher, topic, b"eventually")

    assert wait_until(lambda: got.datas() == [b"eventually"], timeout=15)
    assert emulator.faults.take("StreamingPull") is None


def test_injected_publish_failures_can_target_one_topic(publisher, topic, emulator):
    other = publisher.create_topic(name=unique("topics")).name
    emulator.faults.fail_next("Publish", n=1, code=grpc.StatusCode.PERMISSION_DENIED, topic=other)

    assert publish_all(publisher, topic, b"unaffected")
    with pytest.raises(exceptions.PermissionDenied):
        publisher.publish(other, b"refused").result(timeout=10)
    assert publish_all(publisher, other, b"fine-again")


def test_the_client_retries_through_injected_unavailable_publishes(publisher, topic, emulator):
    emulator.faults.fail_next("Publish", n=2, code=grpc.StatusCode.UNAVAILABLE)
    assert publish_all(publisher, topic, b"retried")
    assert emulator.faults.take("Publish") is None, "both injected failures were consumed"


def test_a_delay_only_fault_stalls_the_call_but_lets_it_succeed(subscriber, emulator, topic):
    emulator.faults.fail_next("GetTopic", n=1, code=None, delay=0.5)
    publisher = pubsub_v1.PublisherClient()
    started = time.monotonic()
    assert publisher.get_topic(topic=topic).name == topic
    assert time.monotonic() - started >= 0.5


def test_failed_acks_leave_the_message_to_be_redelivered(
    emulator, publisher, subscriber, topic, make_subscription
):
    sub = make_subscription()
    publish_all(publisher, topic, b"ack-lost")
    first = subscriber.pull(subscription=sub, max_messages=1, timeout=10).received_messages[0]
    emulator.faults.fail_next("Acknowledge", n=1, code=grpc.StatusCode.PERMISSION_DENIED)
    with pytest.raises(exceptions.PermissionDenied):
        subscriber.acknowledge(subscription=sub, ack_ids=[first.ack_id])
    subscriber.modify_ack_deadline(subscription=sub, ack_ids=[first.ack_id], ack_deadline_seconds=0)

    again = subscriber.pull(subscription=sub, max_messages=1, timeout=10).received_messages

    assert [m.message.data for m in again] == [b"ack-lost"]


def test_stopping_the_emulator_ends_open_streams_with_unavailable_not_ok():
    emu = Emulator(port=0).start()
    channel = grpc.insecure_channel(emu.address)
    try:
        stub = channel.unary_unary(
            "/google.pubsub.v1.Publisher/CreateTopic",
            request_serializer=_pb.Topic.SerializeToString,
            response_deserializer=_pb.Topic.FromString,
        )
        stub(_pb.Topic(name="projects/p/topics/shutdown"))
        create_sub = channel.unary_unary(
            "/google.pubsub.v1.Subscriber/CreateSubscription",
            request_serializer=_pb.Subscription.SerializeToString,
            response_deserializer=_pb.Subscription.FromString,
        )
        create_sub(
            _pb.Subscription(
                name="projects/p/subscriptions/shutdown", topic="projects/p/topics/shutdown"
            )
        )
        pull = channel.stream_stream(
            "/google.pubsub.v1.Subscriber/StreamingPull",
            request_serializer=_pb.StreamingPullRequest.SerializeToString,
            response_deserializer=_pb.StreamingPullResponse.FromString,
        )
        first = _pb.StreamingPullRequest(
            subscription="projects/p/subscriptions/shutdown", stream_ack_deadline_seconds=10
        )
        keep_open = threading.Event()

        def requests():
            yield first
            keep_open.wait(10)

        call = pull(requests())
        state = emu.broker.subscription("projects/p/subscriptions/shutdown")
        assert wait_until(lambda: state.stream_count() == 1, timeout=5)

        emu.stop(grace=1.0)

        with pytest.raises(grpc.RpcError) as ended:
            list(call)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        keep_open.set()
    finally:
        channel.close()
        emu.stop()
