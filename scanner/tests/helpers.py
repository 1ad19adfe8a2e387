"""Scanner test helpers: pulling everything a run published."""

from __future__ import annotations

from dataclasses import dataclass

from google.cloud import pubsub_v1

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
