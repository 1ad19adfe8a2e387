"""`mini-scan setup`: create the topics and subscriptions the pipeline needs. Idempotent."""

from __future__ import annotations

import sys

import structlog
from google.api_core import exceptions as google_exceptions
from google.cloud import pubsub_v1
from google.protobuf import duration_pb2

from processor.app import StartupError, wait_for
from processor.config import ArgumentParser, ConfigError, SetupSettings, add_arguments, load
from processor.observability import configure_logging

_log = structlog.get_logger("processor.setup")


def ensure_resources(settings: SetupSettings) -> list[str]:
    """Create what is missing; returns the names created (empty when all existed)."""
    settings.apply_emulator_host()
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    created: list[str] = []

    def create(kind: str, name: str, call: object, request: dict) -> None:
        try:
            call(request=request, timeout=10)  # type: ignore[operator]
            created.append(name)
            _log.info("created", kind=kind, name=name)
        except google_exceptions.AlreadyExists:
            _log.info("exists", kind=kind, name=name)

    def topics() -> None:
        for topic in (settings.topic_path, settings.dead_letter_topic_path):
            create("topic", topic, publisher.create_topic, {"name": topic})

    wait_for("Pub/Sub", topics, settings.startup_timeout)
    create(
        "subscription",
        settings.subscription_path,
        subscriber.create_subscription,
        {
            "name": settings.subscription_path,
            "topic": settings.topic_path,
            "ack_deadline_seconds": settings.ack_deadline_seconds,
            "retry_policy": {
                "minimum_backoff": _seconds(settings.min_retry_backoff),
                "maximum_backoff": _seconds(settings.max_retry_backoff),
            },
            # A backstop only: the processor dead-letters bad input itself, with a reason.
            "dead_letter_policy": {
                "dead_letter_topic": settings.dead_letter_topic_path,
                "max_delivery_attempts": settings.max_delivery_attempts,
            },
        },
    )
    create(
        "subscription",
        settings.dead_letter_subscription_path,
        subscriber.create_subscription,
        {
            "name": settings.dead_letter_subscription_path,
            "topic": settings.dead_letter_topic_path,
            "ack_deadline_seconds": settings.ack_deadline_seconds,
            "message_retention_duration": _seconds(7 * 24 * 3600),
        },
    )
    subscriber.close()
    return created


def _seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_arguments(parser, SetupSettings)
    try:
        settings = load(SetupSettings, parser.parse_args(argv))
    except ConfigError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        ensure_resources(settings)
    except (StartupError, google_exceptions.GoogleAPIError) as exc:
        print(f"{parser.prog}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    return 0
