"""Publishing rejected messages to the dead-letter topic, then acking them."""

from __future__ import annotations

import datetime as dt
import threading
import time
from concurrent import futures
from typing import Any

import structlog
from google.cloud import pubsub_v1

from processor.delivery import Acknowledger, Received
from processor.observability import Metrics, excerpt
from processor.schema import Reason

_log = structlog.get_logger("processor.deadletter")

MAX_ATTRIBUTE_BYTES = 1024  # Pub/Sub's limit on an attribute value


class DeadLetters:
    """Publishes a message that can never be stored, with why, and acks it only once the
    publish is confirmed; if the publish fails, the message is nacked and will come again."""

    def __init__(
        self,
        publisher: pubsub_v1.PublisherClient,
        topic_path: str,
        subscription_path: str,
        acks: Acknowledger,
        metrics: Metrics,
    ) -> None:
        self._publisher = publisher
        self._topic = topic_path
        self._subscription = subscription_path
        self._acks = acks
        self._metrics = metrics
        self._in_flight: set[futures.Future[Any]] = set()
        self._lock = threading.Lock()
        # One summary line a second at most, however many messages are rejected.
        self._unreported: dict[str, int] = {}
        self._samples: dict[str, dict[str, str]] = {}
        self._reported_at = 0.0

    def send(self, message: Received, reason: Reason, error: str) -> None:
        """Publish `message` with `reason` to the dead-letter topic; ack or nack it after."""
        published = dt.datetime.fromtimestamp(message.publish_time, dt.UTC)
        attributes = dict(message.attributes)
        attributes.update(
            reason=str(reason),
            error=_truncate(error),
            source_subscription=self._subscription,
            source_message_id=message.message_id,
            source_publish_time=published.isoformat(),
        )
        future = self._publisher.publish(self._topic, message.data, **attributes)
        with self._lock:
            self._in_flight.add(future)
        future.add_done_callback(lambda done: self._settle(done, message, reason, error))

    def wait(self, timeout: float) -> bool:
        """Wait for the publishes under way; True if none is left."""
        with self._lock:
            pending = list(self._in_flight)
        _, not_done = futures.wait(pending, timeout=timeout)
        self.report(force=True)
        return not not_done

    def report(self, force: bool = False) -> None:
        """Log the dead letters not yet reported: counts by reason and a sample of each."""
        with self._lock:
            now = time.monotonic()
            if not self._unreported or (not force and now - self._reported_at < 1.0):
                return
            counts, samples = self._unreported, self._samples
            self._unreported, self._samples, self._reported_at = {}, {}, now
        _log.warning("dead_lettered", counts=counts, samples=samples)

    def _settle(
        self, done: futures.Future[Any], message: Received, reason: Reason, why: str
    ) -> None:
        with self._lock:
            self._in_flight.discard(done)
        failure = done.exception()
        if failure is not None:
            self._acks.nack([message])
            self._metrics.nacked.inc()
            _log.error(
                "dead_letter_publish_failed",
                reason=str(reason),
                message_id=message.message_id,
                error=excerpt(str(failure)),
            )
            return
        self._acks.ack([message])
        self._metrics.dead_lettered.labels(reason=str(reason)).inc()
        self._metrics.acked.inc()
        with self._lock:
            self._unreported[reason] = self._unreported.get(reason, 0) + 1
            self._samples.setdefault(
                reason, {"message_id": message.message_id, "error": excerpt(why)}
            )
        self.report()


def _truncate(text: str) -> str:
    encoded = text.encode()
    if len(encoded) <= MAX_ATTRIBUTE_BYTES:
        return text
    return encoded[: MAX_ATTRIBUTE_BYTES - 3].decode("utf-8", "ignore") + "..."
