"""Validation and defaults for topic and subscription settings, as the real service applies them."""

from __future__ import annotations

from typing import Any

from emulator import _pb, names
from emulator.errors import InvalidArgument
from emulator.model import DeliveryPolicy

DEFAULT_ACK_DEADLINE = 10
DEFAULT_RETENTION = 7 * 86400
MAX_TOPIC_RETENTION = 31 * 86400
DEFAULT_EXPIRATION_TTL = 31 * 86400
DEFAULT_MAX_DELIVERY_ATTEMPTS = 5
DEFAULT_MIN_BACKOFF = 10
DEFAULT_MAX_BACKOFF = 600

UPDATABLE_SUBSCRIPTION_FIELDS = frozenset(
    {
        "ack_deadline_seconds",
        "retry_policy",
        "dead_letter_policy",
        "labels",
        "message_retention_duration",
        "retain_acked_messages",
        "expiration_policy",
    }
)
UPDATABLE_TOPIC_FIELDS = frozenset({"labels", "message_retention_duration"})


def seconds(duration: Any) -> float:
    return duration.seconds + duration.nanos / 1e9


def check_update_mask(paths: list[str], allowed: frozenset[str]) -> None:
    if not paths:
        raise InvalidArgument("The update_mask in the request must be set.")
    for path in paths:
        if path not in allowed:
            raise InvalidArgument(f"Invalid update_mask provided: {path} cannot be updated.")


def normalize_topic(topic: Any) -> Any:
    """Return a copy of the topic with its settings validated."""
    names.topic(topic.name)
    out = _pb.Topic()
    out.CopyFrom(topic)
    if out.HasField("message_retention_duration"):
        retention = seconds(out.message_retention_duration)
        if not 600 <= retention <= MAX_TOPIC_RETENTION:
            raise InvalidArgument("Invalid message_retention_duration: must be 10m to 31d.")
    return out


def normalize_subscription(sub: Any, check_topic: bool = True) -> Any:
    """Return a copy of the subscription with validated settings and the service's defaults."""
    names.subscription(sub.name)
    if check_topic:
        names.topic(sub.topic)
    out = _pb.Subscription()
    out.CopyFrom(sub)
    _ack_deadline(out)
    _retention(out)
    _dead_letter_policy(out)
    _retry_policy(out)
    _unsupported(out)
    if not out.HasField("expiration_policy"):
        out.expiration_policy.ttl.seconds = DEFAULT_EXPIRATION_TTL
    out.state = _pb.Subscription.State.ACTIVE
    return out


def _ack_deadline(out: Any) -> None:
    if out.ack_deadline_seconds == 0:
        out.ack_deadline_seconds = DEFAULT_ACK_DEADLINE
    elif not 10 <= out.ack_deadline_seconds <= 600:
        raise InvalidArgument(
            "Invalid ack_deadline_seconds: must be between 10 and 600 seconds "
            f"(got {out.ack_deadline_seconds})."
        )


def _retention(out: Any) -> None:
    if not out.HasField("message_retention_duration"):
        out.message_retention_duration.seconds = DEFAULT_RETENTION
    elif not 600 <= seconds(out.message_retention_duration) <= DEFAULT_RETENTION:
        raise InvalidArgument("Invalid message_retention_duration: must be 10m to 7d.")


def _dead_letter_policy(out: Any) -> None:
    if not out.HasField("dead_letter_policy"):
        return
    policy = out.dead_letter_policy
    if not policy.dead_letter_topic:
        raise InvalidArgument("Invalid dead_letter_policy: dead_letter_topic must be set.")
    names.topic(policy.dead_letter_topic)
    if policy.max_delivery_attempts == 0:
        policy.max_delivery_attempts = DEFAULT_MAX_DELIVERY_ATTEMPTS
    elif not 5 <= policy.max_delivery_attempts <= 100:
        raise InvalidArgument(
            "Invalid dead_letter_policy: max_delivery_attempts must be between 5 and 100."
        )


def _retry_policy(out: Any) -> None:
    if not out.HasField("retry_policy"):
        return
    policy = out.retry_policy
    if not policy.HasField("minimum_backoff"):
        policy.minimum_backoff.seconds = DEFAULT_MIN_BACKOFF
    if not policy.HasField("maximum_backoff"):
        policy.maximum_backoff.seconds = DEFAULT_MAX_BACKOFF
    low, high = seconds(policy.minimum_backoff), seconds(policy.maximum_backoff)
    if not (0 <= low <= 600 and 0 <= high <= 600 and low <= high):
        raise InvalidArgument(
            "Invalid retry_policy: backoffs must be within 0-600s and minimum <= maximum."
        )


def _unsupported(out: Any) -> None:
    # Accepting these and then ignoring them would deliver the wrong messages in tests.
    if out.filter:
        raise InvalidArgument("Subscription filters are not supported by this emulator.")
    if out.push_config.push_endpoint:
        raise InvalidArgument("Push delivery is not supported by this emulator.")
    if out.enable_exactly_once_delivery:
        raise InvalidArgument("Exactly-once delivery is not supported by this emulator.")


def delivery_policy(sub: Any) -> DeliveryPolicy:
    """The delivery-relevant part of a normalized subscription."""
    policy = DeliveryPolicy(
        ack_deadline=sub.ack_deadline_seconds,
        retention=seconds(sub.message_retention_duration),
        ordered=sub.enable_message_ordering,
    )
    if sub.HasField("dead_letter_policy"):
        policy.max_attempts = sub.dead_letter_policy.max_delivery_attempts
    if sub.HasField("retry_policy"):
        policy.min_backoff = seconds(sub.retry_policy.minimum_backoff)
        policy.max_backoff = seconds(sub.retry_policy.maximum_backoff)
    return policy
