"""`mini-scan setup`: create the topics and subscriptions the pipeline needs. Idempotent."""

from __future__ import annotations

import argparse
import sys
import threading

import structlog
from google.api_core import exceptions as google_exceptions
from google.cloud import pubsub_v1
from google.protobuf import duration_pb2

from processor.commands import run_command
from processor.config import ArgumentParser, SetupSettings, add_arguments, load
from processor.errors import PubSubError, first_line
from processor.runtime.dependencies import wait_for
from processor.runtime.logs import configure_logging
from processor.stopping import Stopped, stop_on_signals

_log = structlog.get_logger("processor.commands.setup")


def ensure_resources(settings: SetupSettings, stop: threading.Event | None = None) -> list[str]:
    """Create what is missing; returns the names created (empty when all existed). Waits up to
    STARTUP_TIMEOUT for Pub/Sub; raises `Stopped` as soon as `stop` is set while it waits."""
    settings.apply_emulator_host()
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    created: list[str] = []
    done: set[str] = set()

    def create(kind: str, name: str, call: object, request: dict) -> None:
        if name in done:
            return
        try:
            # No client-side retry (it would retry UNAVAILABLE for up to 10 minutes, deaf to a
            # stop): wait_for below retries the whole set, stopping when asked.
            call(request=request, timeout=10, retry=None)  # type: ignore[operator]
            created.append(name)
            _log.info("created", kind=kind, name=name)
        except google_exceptions.AlreadyExists:
            _log.info("exists", kind=kind, name=name)
        done.add(name)

    def create_all() -> None:
        for topic in (settings.topic_path, settings.dead_letter_topic_path):
            create("topic", topic, publisher.create_topic, {"name": topic})
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

    wait_for("Pub/Sub", create_all, settings.startup_timeout, stop)
    subscriber.close()
    return created


def _seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    add_arguments(parser, SetupSettings)
    return run_command(parser, _setup, argv)


def _setup(args: argparse.Namespace) -> int:
    settings = load(SetupSettings, args)
    configure_logging(settings.log_level, settings.log_format)
    try:
        with stop_on_signals() as stop:
            ensure_resources(settings, stop)
    except Stopped as exc:  # not done: a script or compose must not go on as if it were
        print(f"mini-scan setup: {exc}", file=sys.stderr)
        return stop.exit_code()
    except google_exceptions.GoogleAPIError as exc:
        raise PubSubError(first_line(exc)) from exc
    return 0
