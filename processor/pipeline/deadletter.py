"""Publishing messages that can never be stored to the dead-letter topic, with why; the
processor acks each once its publish is confirmed, and nacks it if the publish failed.

The dead-letter copy is the original data and attributes plus the reason attributes. When that
does not fit Pub/Sub's limits (a rejected message near 10 MB, or one already carrying close to
100 attributes), the copy is cut to fit rather than left to fail and loop: original attributes
beyond the limit are dropped (their count in `dropped_attributes`, the reason attributes are
always kept), and data that does not fit is truncated, with `truncated=true`, `original_size`
and `original_sha256` (hex) saying what it was.

Those attribute names are reserved: a message arriving with any of them (or with the prefix of
Pub/Sub's own dead-letter attributes) has it dropped from its copy, so whoever publishes to the
topic cannot forge a reason, an error or a `truncated` mark that `mini-scan dlq` would trust.
They keep their plain names (no prefix): they are documented for whoever reads `scan-dlq`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import structlog
from google.cloud import pubsub_v1
from google.pubsub_v1 import types as pubsub_types

from processor.pipeline.messages import Received
from processor.runtime.logs import excerpt
from processor.runtime.metrics import Metrics
from processor.schema import Reason

_log = structlog.get_logger("processor.pipeline.deadletter")

# Pub/Sub's limits (https://cloud.google.com/pubsub/quotas#resource_limits).
MAX_ATTRIBUTE_BYTES = 1024  # an attribute value
MAX_ATTRIBUTES = 100  # attributes per message
MAX_REQUEST_BYTES = 10_000_000  # a serialized publish request, topic and message included
# The client holds several copies of a message while its publish is under way: large dead
# letters wait for room rather than multiply memory (two maximum-size ones at a time).
MAX_BYTES_IN_FLIGHT = 2 * MAX_REQUEST_BYTES
# Longest a caller waits for that room: a stream thread must hear a pause or a stop.
SEND_WAIT_SECONDS = 10.0

# What the dead-lettering writes, and what Pub/Sub's dead-letter policy adds (it forwards a
# message after MAX_DELIVERY_ATTEMPTS as it is, with attributes of this prefix and no reason).
RESERVED_ATTRIBUTES = frozenset(
    (
        "reason",
        "error",
        "source_subscription",
        "source_message_id",
        "source_publish_time",
        "dropped_attributes",
        "truncated",
        "original_size",
        "original_sha256",
    )
)
POLICY_PREFIX = "CloudPubSubDeadLetterSource"


def is_reserved(key: str) -> bool:
    """Whether an attribute is one only the dead-lettering (or Pub/Sub's policy) may set."""
    return key in RESERVED_ATTRIBUTES or key.startswith(POLICY_PREFIX)


class DeadLetters:
    """Publishes a message that can never be stored, with why, and reports to `settled`
    whether the publish was confirmed (True) or failed (False)."""

    def __init__(
        self,
        publisher: pubsub_v1.PublisherClient,
        topic_path: str,
        subscription_path: str,
        settled: Callable[[Received, bool], None],
        metrics: Metrics,
    ) -> None:
        self._publisher = publisher
        self._topic = topic_path
        self._subscription = subscription_path
        self._settled = settled
        self._metrics = metrics
        self._in_flight: set[futures.Future[Any]] = set()
        self._bytes_in_flight = 0
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        # One summary line a second at most, however many messages are rejected.
        self._unreported: dict[str, int] = {}
        self._samples: dict[str, dict[str, str]] = {}
        self._reported_at = 0.0

    def send(self, message: Received, reason: Reason, error: str) -> None:
        """Publish `message` with `reason` to the dead-letter topic; `settled` hears how it went."""
        published = dt.datetime.fromtimestamp(message.publish_time, dt.UTC)
        why = {
            "reason": str(reason),
            "error": _truncate(error),
            "source_subscription": self._subscription,
            "source_message_id": message.message_id,
            "source_publish_time": published.isoformat(),
        }
        original = {k: v for k, v in message.attributes.items() if not is_reserved(k)}
        data, attributes = fit(self._topic, message.data, original, why)
        with self._room:  # back-pressure on the caller (a stream, or the writer), bounded
            room = self._room.wait_for(
                lambda: (
                    self._bytes_in_flight == 0
                    or self._bytes_in_flight + len(data) <= MAX_BYTES_IN_FLIGHT
                ),
                timeout=SEND_WAIT_SECONDS,
            )
            if room:
                self._bytes_in_flight += len(data)
        if not room:  # the publishes ahead are stuck: hand it back rather than block a stream
            _log.warning("dead_letter_deferred", reason=str(reason), message_id=message.message_id)
            self._settled(message, False)
            return
        future = self._publisher.publish(self._topic, data, **attributes)
        with self._lock:
            self._in_flight.add(future)
        future.add_done_callback(lambda done: self._settle(done, message, len(data), reason, error))

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
        self, done: futures.Future[Any], message: Received, size: int, reason: Reason, why: str
    ) -> None:
        with self._room:
            self._in_flight.discard(done)
            self._bytes_in_flight -= size
            self._room.notify_all()
        failure = done.exception()
        if failure is not None:
            self._settled(message, False)
            _log.error(
                "dead_letter_publish_failed",
                reason=str(reason),
                message_id=message.message_id,
                error=excerpt(str(failure)),
            )
            return
        self._metrics.dead_lettered.labels(reason=str(reason)).inc()
        self._settled(message, True)
        with self._lock:
            self._unreported[reason] = self._unreported.get(reason, 0) + 1
            self._samples.setdefault(
                reason, {"message_id": message.message_id, "error": excerpt(why)}
            )
        self.report()


def fit(
    topic: str, data: bytes, original: dict[str, str], added: dict[str, str]
) -> tuple[bytes, dict[str, str]]:
    """The dead-letter copy of a message: its data and attributes with `added` on top, cut
    where needed so that its publish request stays within Pub/Sub's limits."""
    attributes = original | added
    if len(attributes) <= MAX_ATTRIBUTES and _fits(topic, data, attributes):
        return data, attributes
    # Cut: the reason attributes stay, with room for the four that say what was cut, and the
    # original attributes follow in key order while there are slots.
    rest = sorted(key for key in original if key not in added)
    kept = rest[: MAX_ATTRIBUTES - len(added) - 4]
    attributes = {key: original[key] for key in kept} | added
    if len(kept) < len(rest):
        attributes["dropped_attributes"] = str(len(rest) - len(kept))
    if _fits(topic, data, attributes):
        return data, attributes
    attributes |= {
        "truncated": "true",
        "original_size": str(len(data)),
        "original_sha256": hashlib.sha256(data).hexdigest(),
    }
    # What the rest of the request takes, plus the length prefixes' growth with the data.
    overhead = _request_size(topic, b"", attributes) + 16
    return data[: MAX_REQUEST_BYTES - overhead], attributes


def _fits(topic: str, data: bytes, attributes: dict[str, str]) -> bool:
    rough = len(topic) + len(data) + sum(len(k) + len(v) for k, v in attributes.items())
    if 4 * rough < MAX_REQUEST_BYTES:  # far from the limit, whatever the encoding adds
        return True
    return _request_size(topic, data, attributes) <= MAX_REQUEST_BYTES


def _request_size(topic: str, data: bytes, attributes: dict[str, str]) -> int:
    """Bytes of the serialized publish request carrying this one message."""
    message = pubsub_types.PubsubMessage(data=data, attributes=attributes)
    request = pubsub_types.PublishRequest(topic=topic, messages=[message])
    return pubsub_types.PublishRequest.pb(request).ByteSize()


def _truncate(text: str) -> str:
    encoded = text.encode()
    if len(encoded) <= MAX_ATTRIBUTE_BYTES:
        return text
    return encoded[: MAX_ATTRIBUTE_BYTES - 3].decode("utf-8", "ignore") + "..."
