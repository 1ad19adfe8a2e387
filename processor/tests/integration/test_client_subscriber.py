"""The client library's stream manager as CONSUMER=client runs it: messages it holds back after a
stream reset must reach the callback once acks make room (issue 21)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.subscriber._protocol.streaming_pull_manager import (
    StreamingPullManager,
)

from emulator import Emulator
from emulator.testing import wait_until
from processor.pipeline.client_subscriber import open_stream
from processor.tests.helpers.pipeline import unique

WINDOW = 10  # flow control: messages per stream


@pytest.fixture
def slow_pause_check(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """While set, the manager's pause check (the last step of handling a response) starts 1 s
    late: the window in which acks that land after messages were held back leave them held.
    In CI the window is microseconds wide and was hit once under load; here it is hit always."""
    widen = threading.Event()
    check = StreamingPullManager.maybe_pause_consumer

    def late_check(self: StreamingPullManager) -> None:
        if widen.is_set():
            time.sleep(1.0)  # the race window itself, widened
        check(self)

    monkeypatch.setattr(StreamingPullManager, "maybe_pause_consumer", late_check)
    return widen


def test_messages_held_back_after_a_stream_reset_reach_the_callback_when_acks_make_room(
    our_emulator: Emulator, emulator_host: str, slow_pause_check: threading.Event
) -> None:
    """Mutation: with the stock manager (`SubscriberClient.subscribe`), 7 of the 20 messages stay
    held, their leases extended for ever, and the callback never sees them."""
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic = publisher.topic_path("test-project", unique("held-topic"))
    subscription = subscriber.subscription_path("test-project", unique("held-sub"))
    publisher.create_topic(name=topic)
    subscriber.create_subscription(name=subscription, topic=topic, ack_deadline_seconds=60)
    state = our_emulator.broker.subscription(subscription)
    state.start_trace()
    received: list[Any] = []
    lock = threading.Lock()

    def callback(message: Any) -> None:
        with lock:
            received.append(message)

    def publish(prefix: bytes) -> list[str]:
        futures = [publisher.publish(topic, prefix + b"%d" % i) for i in range(WINDOW)]
        return [future.result(timeout=30) for future in futures]

    # Given a client holding a full window of messages it has not acked yet
    publish(b"old")
    flow = pubsub_v1.types.FlowControl(max_messages=WINDOW, max_duration_per_lease_extension=20)
    future = open_stream(subscriber, subscription, callback, flow, None)
    try:
        assert wait_until(lambda: len(received) == WINDOW, timeout=10)
        old = list(received)
        # When the stream is reset and the service fills the new stream's window at once
        slow_pause_check.set()
        our_emulator.drop_streams()
        new = publish(b"new")
        assert wait_until(lambda: state.backlog() == (0, 2 * WINDOW), timeout=10), state.describe()
        # and acks let the client read it: 3 new messages fit, 7 are held back, and the other
        # old acks land while it has yet to decide whether to pause
        for message in old[:3]:
            message.ack()
        assert wait_until(lambda: len(received) >= WINDOW + 3, timeout=10)
        for message in old[3:]:
            message.ack()
        # Then the acks that made room release the held messages to the callback
        delivered = wait_until(lambda: len(received) == 2 * WINDOW, timeout=15)
        missing = set(new) - {m.message_id for m in received}
        held = [
            f"{mid}: {place}; {'; '.join(history[-3:])}"
            for mid, (place, history) in state.whereabouts(missing).items()
        ]
        assert delivered, f"{len(received)} of {2 * WINDOW} reached the callback; " + "\n".join(
            held
        )
    finally:
        slow_pause_check.clear()
        for message in received:
            message.ack()
        future.cancel()
        future.result(timeout=10)
        subscriber.close()
