"""Shared test helpers: unique names, a recording subscriber callback, publish-and-wait."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.cloud import pubsub_v1

PROJECT = "emu-test"


def unique(kind: str) -> str:
    return f"projects/{PROJECT}/{kind}/{kind[:-1]}-{uuid.uuid4().hex[:12]}"


@dataclass
class Received:
    data: bytes
    attributes: dict[str, str]
    message_id: str
    delivery_attempt: int | None
    ordering_key: str
    at: float


@dataclass
class Collector:
    """A subscriber callback that records every delivery and acks, nacks or holds it."""

    decide: Callable[[Received], str] = lambda _m: "ack"
    received: list[Received] = field(default_factory=list)
    held: list[Any] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, message: Any) -> None:
        r = Received(
            message.data,
            dict(message.attributes),
            message.message_id,
            message.delivery_attempt,
            message.ordering_key,
            time.monotonic(),
        )
        with self.lock:
            self.received.append(r)
        verdict = self.decide(r)
        if verdict == "ack":
            message.ack()
        elif verdict == "nack":
            message.nack()
        else:
            self.held.append(message)

    def datas(self) -> list[bytes]:
        with self.lock:
            return [r.data for r in self.received]

    def distinct(self) -> set[bytes]:
        return set(self.datas())


def publish_all(
    publisher: pubsub_v1.PublisherClient, topic: str, *datas: bytes, **kw: Any
) -> list[str]:
    """Publish and wait for every message id."""
    futures = [publisher.publish(topic, d, **kw) for d in datas]
    return [f.result(timeout=10) for f in futures]
