"""Scanner fixtures: an in-process emulator per session, a topic and subscription per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from google.cloud import pubsub_v1

from emulator import Emulator
from scanner.tests.helpers import PROJECT, Stream


@pytest.fixture(scope="session")
def emulator() -> Iterator[Emulator]:
    with Emulator(port=0) as emu:
        yield emu


@pytest.fixture
def stream(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Stream:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator.address)
    name = f"scan-{uuid.uuid4().hex[:12]}"
    topic = f"projects/{PROJECT}/topics/{name}"
    subscription = f"projects/{PROJECT}/subscriptions/{name}"
    pubsub_v1.PublisherClient().create_topic(name=topic)
    subscriber = pubsub_v1.SubscriberClient()
    subscriber.create_subscription(name=subscription, topic=topic, ack_deadline_seconds=60)
    subscriber.close()
    return Stream(emulator.address, name, subscription)
