"""`mini-scan process` / `python -m processor`: wire the parts, wait for dependencies, run until
SIGTERM or SIGINT, shut down within the grace period."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
import structlog
import tenacity
from google.api_core import exceptions as google_exceptions
from google.cloud import pubsub_v1
from google.pubsub_v1.services.subscriber.transports.grpc import SubscriberGrpcTransport

from processor import allocator
from processor.config import (
    ArgumentParser,
    ConfigError,
    DatabaseSettings,
    ProcessorSettings,
    add_arguments,
    load,
)
from processor.consumer import Processor
from processor.observability import HealthServer, Metrics, configure_logging, redact_url
from processor.stopping import Stopped, stop_on_signals
from processor.storage import Repository, migrate, open_engine, unsuitable

_log = structlog.get_logger("processor")
T = TypeVar("T")


class StartupError(Exception):
    """A dependency did not appear in time; the message is one line."""


def wait_for(
    what: str, attempt: Callable[[], T], timeout: float, stop: threading.Event | None = None
) -> T:
    """Call `attempt` until it succeeds, with backoff, for at most `timeout` seconds; raises
    `Stopped` as soon as `stop` is set between attempts (a stop never waits out the timeout)."""
    stop = stop or threading.Event()

    def log_retry(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        _log.warning(
            "waiting_for_dependency",
            dependency=what,
            attempt=state.attempt_number,
            error=str(error).splitlines()[0] if error else "",
        )

    if stop.is_set():
        raise Stopped(f"stopped before {what} was available")
    try:
        return tenacity.Retrying(
            stop=tenacity.stop_after_delay(timeout) | tenacity.stop_when_event_set(stop),
            wait=tenacity.wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.2),
            sleep=stop.wait,
            before_sleep=log_retry,
            reraise=True,
        )(attempt)
    except Exception as exc:
        if stop.is_set():
            raise Stopped(f"stopped while waiting for {what}") from exc
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StartupError(f"{what} not available after {timeout:g}s: {reason}") from exc


def subscriber_client() -> pubsub_v1.SubscriberClient:
    """A subscriber that can receive any message Pub/Sub accepts (up to 10 MB).

    Through PUBSUB_EMULATOR_HOST the client opens a plain channel with gRPC's default 4 MiB
    receive limit (its own production channel has none): a bigger message would then break the
    stream on every delivery, never be processed, and stall the messages sent behind it.
    """
    host = os.environ.get("PUBSUB_EMULATOR_HOST")
    if not host:
        return pubsub_v1.SubscriberClient()
    channel = grpc.insecure_channel(host, options=[("grpc.max_receive_message_length", -1)])
    return pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))


def bootstrap(
    settings: ProcessorSettings, metrics: Metrics, stop: threading.Event | None = None
) -> Processor:
    """Wait for the subscription and the database, migrate, and build the processor."""
    settings.apply_emulator_host()
    subscriber = subscriber_client()
    publisher = pubsub_v1.PublisherClient(
        batch_settings=pubsub_v1.types.BatchSettings(max_latency=0.02, max_messages=500)
    )

    def subscription() -> Any:
        try:
            return subscriber.get_subscription(  # retry=None: wait_for retries, hears a stop
                request={"subscription": settings.subscription_path}, timeout=5, retry=None
            )
        except google_exceptions.NotFound as exc:
            raise LookupError(
                f"subscription {settings.subscription_path} does not exist (run mini-scan setup)"
            ) from exc

    found = wait_for("subscription", subscription, settings.startup_timeout, stop)
    if found.enable_exactly_once_delivery and settings.consumer == "batch":
        raise StartupError(
            f"subscription {settings.subscription_path} has exactly-once delivery enabled, "
            "which CONSUMER=batch does not support: disable it (the merge is idempotent, so it "
            "buys nothing here) or set CONSUMER=client"
        )
    engine = open_engine(settings.database_url, timeout=settings.database_timeout)
    wait_for("database", lambda: migrate(engine), settings.startup_timeout, stop)
    if problem := unsuitable(engine):
        raise StartupError(problem)
    return Processor(settings, Repository(engine), subscriber, publisher, metrics)


def run(settings: ProcessorSettings, stop: threading.Event) -> int:
    """Run until `stop` is set (or a stream fails); the process's exit code."""
    metrics = Metrics()
    processor: Processor | None = None
    health = None
    if settings.metrics_port:
        health = HealthServer(
            settings.metrics_host,
            settings.metrics_port,
            metrics,
            lambda: processor is not None and processor.ready(),
            lambda: processor is None or processor.alive(),
        ).start()
    _log.info(
        "starting",
        subscription=settings.subscription_path,
        database=redact_url(settings.database_url),
        streams=settings.streams,
        batch_size=settings.batch_size,
        metrics_port=health.port if health else None,
    )
    try:
        processor = bootstrap(settings, metrics, stop).start()
        while not stop.wait(0.5):
            processor.supervise()  # the ready gauge, and pausing in a long outage
            if processor.stream_failed.is_set():
                processor.shutdown(settings.shutdown_grace)
                return 1
        processor.shutdown(settings.shutdown_grace)
        return 0
    finally:
        if health:
            health.stop()


def tune_runtime() -> None:
    """Process-wide settings for a consumer: call before its threads start.

    The allocator hands large message buffers back to the system (processor/allocator.py). The
    switch interval is CPython's 5 ms default cut to 1 ms: the stream readers and the lease keeper
    wait on the GIL while the writer decodes a batch, and with 5 ms slices the writer's batch
    waits on their turns (measured: bench/e2e.py, BENCHMARKS.md).
    """
    allocator.tune()
    sys.setswitchinterval(0.001)


def main(argv: list[str] | None = None) -> int:
    tune_runtime()
    parser = ArgumentParser(description="Consume scan results into the database.")
    add_arguments(parser, ProcessorSettings)
    args = parser.parse_args(argv)
    try:
        settings = load(ProcessorSettings, args)
    except ConfigError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        with stop_on_signals() as stop:
            return run(settings, stop)
    except Stopped as exc:  # a requested stop is this command's normal end, even at start-up
        _log.info("stopped_during_startup", reason=str(exc))
        return 0
    except StartupError as exc:
        _log.error("startup_failed", error=str(exc))
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the metrics port is taken
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1


def migrate_main(argv: list[str] | None = None) -> int:
    """`mini-scan migrate`: apply the schema migrations and exit."""
    parser = ArgumentParser(description="Bring the database schema up to date.")
    add_arguments(parser, DatabaseSettings)
    try:
        settings = load(DatabaseSettings, parser.parse_args(argv))
        engine = open_engine(settings.database_url)
        migrate(engine)
        if problem := unsuitable(engine):
            raise RuntimeError(problem)
    except ConfigError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"{parser.prog}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"database at {redact_url(settings.database_url)} is up to date")
    return 0
