"""Dead-letter policy and retry backoff, as a client observes them."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from emulator.testing import wait_until
from emulator.tests.helpers import Collector, publish_all, unique

# Pull(return_immediately=True) is deprecated but still the plain way to ask "is anything there?".
pytestmark = pytest.mark.filterwarnings("ignore:The return_immediately flag:DeprecationWarning")


def test_a_message_is_dead_lettered_after_max_delivery_attempts_with_source_attributes(
    publisher, topic, make_subscription, subscribe
):
    dlq_topic = publisher.create_topic(name=unique("topics")).name
    dlq_sub = make_subscription(of=dlq_topic)
    sub = make_subscription(
        dead_letter_policy={"dead_letter_topic": dlq_topic, "max_delivery_attempts": 5}
    )
    publish_all(publisher, topic, b"poison", kind="bad")
    source, dead = Collector(decide=lambda _r: "nack"), Collector()

    subscribe(sub, source)
    subscribe(dlq_sub, dead)

    assert wait_until(lambda: len(dead.received) >= 1, timeout=10)
    assert [r.delivery_attempt for r in source.received] == [1, 2, 3, 4, 5]
    forwarded = dead.received[0]
    assert forwarded.data == b"poison"
    project, sub_id = sub.split("/")[1], sub.split("/")[3]
    assert forwarded.attributes["kind"] == "bad"
    assert forwarded.attributes["CloudPubSubDeadLetterSourceDeliveryCount"] == "5"
    assert forwarded.attributes["CloudPubSubDeadLetterSourceSubscription"] == sub_id
    assert forwarded.attributes["CloudPubSubDeadLetterSourceSubscriptionProject"] == project
    assert forwarded.attributes["CloudPubSubDeadLetterSourceTopicPublishTime"].endswith("+00:00")
    assert len(source.received) == 5, "dead-lettered messages are acked on the source"


def test_a_message_acked_on_a_later_attempt_is_not_dead_lettered(
    publisher, subscriber, topic, make_subscription, subscribe
):
    dlq_topic = publisher.create_topic(name=unique("topics")).name
    dlq_sub = make_subscription(of=dlq_topic)
    sub = make_subscription(dead_letter_policy={"dead_letter_topic": dlq_topic})
    publish_all(publisher, topic, b"flaky")
    got = Collector(decide=lambda r: "ack" if r.delivery_attempt == 3 else "nack")

    subscribe(sub, got)

    assert wait_until(lambda: len(got.received) >= 3, timeout=10)
    resp = subscriber.pull(subscription=dlq_sub, max_messages=1, return_immediately=True)
    assert list(resp.received_messages) == []


def test_retry_policy_waits_at_least_the_minimum_backoff_before_redelivery(
    publisher, topic, make_subscription, subscribe
):
    sub = make_subscription(
        retry_policy={"minimum_backoff": {"seconds": 1}, "maximum_backoff": {"seconds": 2}}
    )
    publish_all(publisher, topic, b"later")
    got = Collector(decide=lambda r: "nack" if len(got.received) < 3 else "ack")

    subscribe(sub, got)

    assert wait_until(lambda: len(got.received) >= 3, timeout=10)
    times = [r.at for r in got.received[:3]]
    assert times[1] - times[0] >= 0.95, "first retry after minimum_backoff"
    assert times[2] - times[1] >= 1.9, "backoff doubles, capped at maximum_backoff"


def test_without_a_retry_policy_a_nack_redelivers_at_once(
    publisher, topic, make_subscription, subscribe
):
    sub = make_subscription()
    publish_all(publisher, topic, b"now")
    got = Collector(decide=lambda r: "nack" if len(got.received) == 1 else "ack")

    subscribe(sub, got)

    assert wait_until(lambda: len(got.received) >= 2, timeout=5)
    assert got.received[1].at - got.received[0].at < 0.9


def _nack_until_stopped(subscribe: Any, sub: str) -> Collector:
    source = Collector(decide=lambda _r: "nack")
    subscribe(sub, source)
    return source


def test_a_message_whose_dead_letter_copy_does_not_fit_stays_on_its_subscription_and_is_counted(
    emulator, publisher, topic, make_subscription, subscribe
):
    # Given a message with 100 attributes: its copy would carry 104, over Pub/Sub's limit.
    dlq_topic = publisher.create_topic(name=unique("topics")).name
    dlq_sub = make_subscription(of=dlq_topic)
    sub = make_subscription(
        dead_letter_policy={"dead_letter_topic": dlq_topic, "max_delivery_attempts": 5}
    )
    publish_all(publisher, topic, b"wide", **{f"k{i}": "v" for i in range(100)})
    failures_before = emulator.stats()["dead_letter_forward_failures"]

    with capture_logs() as logs:
        source = _nack_until_stopped(subscribe, sub)
        # Then it is still delivered after its fifth attempt, however often the forward fails.
        assert wait_until(lambda: len(source.received) >= 12, timeout=20)

    assert {r.data for r in source.received} == {b"wide"}
    assert max(r.delivery_attempt for r in source.received) >= 12
    assert emulator.broker.subscription(dlq_sub).backlog() == (0, 0)
    failures = emulator.stats()["dead_letter_forward_failures"] - failures_before
    assert failures >= 7
    lines = [e for e in logs if e["event"] == "dead_letter_forward_failed"]
    assert lines, "a failed forward is logged"
    assert lines[0]["subscription"] == sub
    assert "attribute_count" in lines[0]["error"]
    assert len(lines) < failures, "one line per interval, not one per failed forward"


def test_a_message_whose_dead_letter_topic_is_gone_waits_on_its_subscription_until_it_is_back(
    emulator, publisher, topic, make_subscription, subscribe
):
    dlq_topic = publisher.create_topic(name=unique("topics")).name
    sub = make_subscription(
        dead_letter_policy={"dead_letter_topic": dlq_topic, "max_delivery_attempts": 5}
    )
    publisher.delete_topic(topic=dlq_topic)
    publish_all(publisher, topic, b"orphan")
    failures_before = emulator.stats()["dead_letter_forward_failures"]
    source = _nack_until_stopped(subscribe, sub)
    assert wait_until(lambda: len(source.received) >= 8, timeout=20)
    assert emulator.stats()["dead_letter_forward_failures"] > failures_before

    # When the dead-letter topic (with a subscription) is back, the next failed attempt forwards it.
    publisher.create_topic(name=dlq_topic)
    dlq_sub = make_subscription(of=dlq_topic)
    dead = Collector()
    subscribe(dlq_sub, dead)

    assert wait_until(lambda: len(dead.received) == 1, timeout=20)
    assert dead.received[0].data == b"orphan"
    assert int(dead.received[0].attributes["CloudPubSubDeadLetterSourceDeliveryCount"]) >= 8
