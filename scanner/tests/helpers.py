"""Scanner test helpers: pulling everything a run published."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest
from google.cloud import pubsub_v1

from emulator import Emulator
from emulator.testing import wait_until

PROJECT = "scanner-test"


@dataclass(frozen=True)
class Stream:
    """A topic with a subscription on it, and the scanner flags that name the topic."""

    address: str
    topic_name: str
    subscription: str

    @property
    def flags(self) -> list[str]:
        return ["--pubsub-project-id", PROJECT, "--pubsub-topic", self.topic_name]


def pull_all(subscription: str, expected: int, timeout: float = 30.0) -> dict[str, bytes]:
    """Pull (and ack) until `expected` distinct messages arrived; message id -> data."""
    received: dict[str, bytes] = {}
    subscriber = pubsub_v1.SubscriberClient()

    def pull_some() -> bool:
        response = subscriber.pull(
            request={"subscription": subscription, "max_messages": 1000}, timeout=5
        )
        for item in response.received_messages:
            received[item.message.message_id] = item.message.data
        if response.received_messages:
            ack_ids = [item.ack_id for item in response.received_messages]
            subscriber.acknowledge(request={"subscription": subscription, "ack_ids": ack_ids})
        return len(received) >= expected

    try:
        wait_until(pull_some, timeout=timeout, interval=0.01)
    finally:
        subscriber.close()
    return received


def make_stream(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Stream:
    """A fresh topic with a subscription, and PUBSUB_EMULATOR_HOST pointing at the emulator."""
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator.address)
    name = f"scan-{uuid.uuid4().hex[:12]}"
    topic = f"projects/{PROJECT}/topics/{name}"
    subscription = f"projects/{PROJECT}/subscriptions/{name}"
    pubsub_v1.PublisherClient().create_topic(name=topic)
    subscriber = pubsub_v1.SubscriberClient()
    subscriber.create_subscription(name=subscription, topic=topic, ack_deadline_seconds=60)
    subscriber.close()
    return Stream(emulator.address, name, subscription)
