"""`mini-scan process` / `python -m processor`: wire the parts, wait for dependencies, run until
SIGTERM or SIGINT, shut down within the grace period."""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

import structlog
from google.api_core import exceptions as google_exceptions
from google.cloud import pubsub_v1
from sqlalchemy.engine import Engine

from processor.commands import run_command
from processor.config import ArgumentParser, ProcessorSettings, add_arguments, load
from processor.errors import StartupError
from processor.pipeline.processor import Processor
from processor.runtime import allocator
from processor.runtime.dependencies import wait_for
from processor.runtime.health import HealthServer
from processor.runtime.logs import configure_logging, redact_url
from processor.runtime.metrics import Metrics
from processor.runtime.pubsub import publisher_client, subscriber_client
from processor.stopping import Stopped, stop_on_signals
from processor.storage import Repository, behind, migrate, open_engine, unsuitable

_log = structlog.get_logger("processor.commands.process")


def bootstrap(
    settings: ProcessorSettings, metrics: Metrics, stop: threading.Event | None = None
) -> Processor:
    """Wait for the subscription and the database, migrate (or, with MIGRATE off, wait for the
    schema to be at the newest revision), and build the processor."""
    settings.apply_emulator_host()
    subscriber = subscriber_client()
    publisher = publisher_client(
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
    if settings.migrate:
        wait_for("database", lambda: migrate(engine), settings.startup_timeout, stop)
    else:
        wait_for("database schema", lambda: _at_head(engine), settings.startup_timeout, stop)
    if problem := unsuitable(engine):
        raise StartupError(problem)
    return Processor(settings, Repository(engine), subscriber, publisher, metrics)


def _at_head(engine: Engine) -> None:
    if problem := behind(engine):
        raise LookupError(problem)


def run(settings: ProcessorSettings, stop: threading.Event, metrics: Metrics | None = None) -> int:
    """Run until `stop` is set (or a stream fails); the process's exit code. Tests pass
    `metrics` to read them without a metrics server."""
    metrics = metrics or Metrics()
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

    The allocator hands large message buffers back to the system (runtime/allocator.py). The
    switch interval is CPython's 5 ms default cut to 1 ms: the stream readers and the lease
    keeper wait on the GIL while the writer decodes a batch, and with 5 ms slices the writer's
    batch waits on their turns (measured: bench/e2e.py, docs/benchmarks.md).
    """
    allocator.tune()
    sys.setswitchinterval(0.001)


def main(argv: list[str] | None = None) -> int:
    tune_runtime()
    parser = ArgumentParser(description="Consume scan results into the database.")
    add_arguments(parser, ProcessorSettings)
    return run_command(parser, _process, argv)


def _process(args: argparse.Namespace) -> int:
    settings = load(ProcessorSettings, args)
    configure_logging(settings.log_level, settings.log_format)
    try:
        with stop_on_signals() as stop:
            return run(settings, stop)
    except Stopped as exc:  # a requested stop is this command's normal end, even at start-up
        _log.info("stopped_during_startup", reason=str(exc))
        return 0
    except StartupError as exc:
        _log.error("startup_failed", error=str(exc))
        raise
    except OSError as exc:  # e.g. the metrics port is taken
        raise StartupError(str(exc)) from exc
