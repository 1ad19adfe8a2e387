"""The same happy-path scenario against our emulator and Google's: a client must see the same."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from google.api_core import exceptions
from google.cloud import pubsub_v1
from google.pubsub_v1.services.publisher import PublisherClient as GapicPublisherClient

from emulator.testing import official_emulator_for_tests, wait_until
from emulator.tests.helpers import Collector

PubsubMessage = pubsub_v1.types.PubsubMessage

pytestmark = pytest.mark.official_emulator


@pytest.fixture(scope="module")
def official_address() -> Iterator[str]:
    with official_emulator_for_tests() as address:  # skips locally when missing, fails in CI
        yield address


def _scenario(address: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", address)
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    run = uuid.uuid4().hex[:8]
    topic = publisher.create_topic(name=f"projects/diff/topics/topic-{run}").name
    sub = subscriber.create_subscription(
        request={
            "name": f"projects/diff/subscriptions/sub-{run}",
            "topic": topic,
            "ack_deadline_seconds": 20,
        }
    )
    ids = [
        publisher.publish(topic, f"m{i}".encode(), n=str(i)).result(timeout=20) for i in range(3)
    ]
    got = Collector(
        decide=lambda r: (
            "nack" if r.data == b"m1" and sum(x.data == b"m1" for x in got.received) == 1 else "ack"
        )
    )
    future = subscriber.subscribe(sub.name, got)
    try:
        delivered = wait_until(lambda: len(got.received) >= 4, timeout=30)
    finally:
        future.cancel()
        with contextlib.suppress(Exception):
            future.result(timeout=10)
    errors = []
    for call in (
        lambda: publisher.create_topic(name=topic),
        lambda: publisher.get_topic(topic=f"projects/diff/topics/missing-{run}"),
    ):
        try:
            call()
        except exceptions.GoogleAPICallError as exc:
            errors.append(type(exc).__name__)
    fetched = subscriber.get_subscription(subscription=sub.name)
    subscriber.close()
    return {
        "delivered": delivered,
        "deliveries": sorted((r.data, tuple(sorted(r.attributes.items()))) for r in got.received),
        "ids_distinct": len(set(ids)) == 3,
        "errors": errors,
        "subscription": (fetched.topic == topic, fetched.ack_deadline_seconds),
        "listed": sub.name in list(publisher.list_topic_subscriptions(topic=topic)),
    }


def test_a_client_observes_the_same_happy_path_on_both_emulators(
    emulator, official_address, monkeypatch
):
    ours = _scenario(emulator.address, monkeypatch)
    theirs = _scenario(official_address, monkeypatch)

    assert ours["delivered"]
    assert ours == theirs


# The publish limits Google's emulator (0.8.20) also enforces; it accepts the others (over 100
# attributes, long keys and values, requests up to 20 MB), which only ours refuses, as the service.
SHARED_LIMITS = {
    "1000 messages": [PubsubMessage(data=b"m")] * 1000,
    "1001 messages": [PubsubMessage(data=b"m")] * 1001,
    "no messages": [],
    "an empty message": [PubsubMessage(data=b"m"), PubsubMessage()],
    "attributes without data": [PubsubMessage(attributes={"k": "v"})],
}


def _limit_outcomes(address: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", address)
    publisher = pubsub_v1.PublisherClient()
    topic = publisher.create_topic(name=f"projects/diff/topics/limits-{uuid.uuid4().hex[:8]}").name
    outcomes = {}
    for case, messages in SHARED_LIMITS.items():
        try:
            GapicPublisherClient.publish(publisher, topic=topic, messages=messages, timeout=20)
            outcomes[case] = "ok"
        except exceptions.GoogleAPICallError as exc:
            outcomes[case] = type(exc).__name__
    return outcomes


def test_both_emulators_refuse_the_same_publish_requests_with_the_same_codes(
    emulator, official_address, monkeypatch
):
    ours = _limit_outcomes(emulator.address, monkeypatch)
    theirs = _limit_outcomes(official_address, monkeypatch)

    assert ours["1001 messages"] == "InvalidArgument"
    assert ours == theirs
