"""The test pipeline: a topic, subscription and dead-letter topic per test, processors run in
this process or as children, and the probes tests read them with (rows, metrics, endpoints)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from google.cloud import pubsub_v1

from emulator import Emulator
from emulator.testing import (
    free_port,
    wait_until,
)
from processor.commands.process import run
from processor.config import ProcessorSettings
from processor.runtime.metrics import Metrics, scrape
from processor.runtime.pubsub import subscriber_client
from processor.schema import Observation
from processor.storage import Repository, open_engine
from processor.tests.helpers.oracle import expected_rows, stored_rows
from processor.tests.helpers.wire import scan

NOW = int(time.time())


@dataclass
class Pipeline:
    """One test's topic, subscription and dead-letter topic, and the processors it runs."""

    settings: ProcessorSettings
    publisher: pubsub_v1.PublisherClient
    _running: list[tuple[threading.Thread, threading.Event, list[int]]] = field(
        default_factory=list
    )

    def publish(self, bodies: Iterable[bytes], **attributes: str) -> list[str]:
        futures = [
            self.publisher.publish(self.settings.topic_path, body, **attributes) for body in bodies
        ]
        return [future.result(timeout=30) for future in futures]

    def start_processor(self, **overrides: Any) -> Callable[[], int]:
        """Run a processor in a thread; returns a function that stops it and gives its exit code
        (and checks that the consumer it ran is the one its settings asked for)."""
        settings = self.settings.model_copy(update=overrides)
        stop, exit_code, metrics = threading.Event(), [], Metrics()
        thread = threading.Thread(
            target=lambda: exit_code.append(run(settings, stop, metrics)), name="test-processor"
        )
        thread.start()
        self._running.append((thread, stop, exit_code))

        def stop_it() -> int:
            stop.set()
            thread.join(timeout=30)
            assert not thread.is_alive(), "processor did not stop"
            # Kills the mutation "CONSUMER ignored": every `client` case would run `batch`.
            assert consumers_used(metrics) == [settings.consumer]
            return exit_code[0]

        return stop_it

    def stop_all(self) -> None:
        for thread, stop, _ in self._running:
            stop.set()
            thread.join(timeout=30)

    def repository(self) -> Repository:
        return Repository(open_engine(self.settings.database_url))

    def rows(self) -> list[Any]:
        """The stored rows; none before the processor made the table (other errors raise)."""
        repository = self.repository()
        try:
            if not sa.inspect(repository.engine).has_table("services"):
                return []
            return repository.rows()
        finally:
            repository.engine.dispose()

    def backlog(self, emulator: Emulator) -> tuple[int, int]:
        """(ready, leased) messages of this pipeline's subscription, as our emulator sees them."""
        return emulator.broker.subscription(self.settings.subscription_path).backlog()

    def dead_letters(self, expected: int, timeout: float = 20.0) -> list[Any]:
        """Pull (and ack) dead letters until `expected` have arrived or `timeout` passes."""
        subscriber = subscriber_client()  # dead letters can be 10 MB
        received: list[Any] = []

        def pull() -> bool:
            response = subscriber.pull(
                subscription=self.settings.dead_letter_subscription_path,
                max_messages=1000,
                timeout=10,
            )
            if response.received_messages:
                subscriber.acknowledge(
                    subscription=self.settings.dead_letter_subscription_path,
                    ack_ids=[m.ack_id for m in response.received_messages],
                )
                received.extend(m.message for m in response.received_messages)
            return len(received) >= expected

        wait_until(pull, timeout=timeout, interval=0.0)
        subscriber.close()
        return received


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def http_get(port: int, path: str) -> tuple[int, str]:
    """Status and body of a GET on the metrics server; (0, "") when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(OSError):  # the body can time out too, on a loaded machine
            return exc.code, exc.read().decode()
        return exc.code, ""
    except OSError:
        return 0, ""


def metric(port: int, name: str) -> float:
    """The value of one sample on /metrics; NaN when the sample is absent or nothing answers,
    so that no comparison (`== 0` included) passes on a renamed metric or a dead server, while
    `wait_until` keeps polling. A name without labels sums every labelled series of it
    (`mini_scan_stream_reconnects_total` over its causes)."""
    samples = scrape(port)
    if name in samples:
        return samples[name]
    labelled = [value for key, value in samples.items() if key.startswith(name + "{")]
    return sum(labelled) if labelled else math.nan


def consumers_used(metrics: Metrics) -> list[str]:
    """The consumers a processor reported running (`mini_scan_consumer_info`)."""
    return [
        sample.labels["consumer"]
        for family in metrics.registry.collect()
        if family.name == "mini_scan_consumer_info"
        for sample in family.samples
        if sample.value == 1
    ]


class ProcessorProcess:
    """`python -m processor` in a child process, configured through the environment."""

    def __init__(self, settings: ProcessorSettings, log_path: Any, **env: str) -> None:
        self.metrics_port = free_port()
        variables = {
            "PUBSUB_TOPIC": settings.pubsub_topic,
            "PUBSUB_SUBSCRIPTION": settings.pubsub_subscription,
            "PUBSUB_DEAD_LETTER_TOPIC": settings.pubsub_dead_letter_topic,
            "DATABASE_URL": settings.database_url,
            "METRICS_PORT": str(self.metrics_port),
            "LOG_FORMAT": "json",
            "BATCH_MAX_WAIT_MS": str(settings.batch_max_wait_ms),
            "CONSUMER": settings.consumer,
        }
        self.consumer = variables["CONSUMER"] = env.get("CONSUMER", settings.consumer)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "processor"],
            env=os.environ | variables | env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 30) -> None:
        ready = wait_until(
            lambda: (
                self.process.poll() is not None or http_get(self.metrics_port, "/readyz")[0] == 200
            ),
            timeout=timeout,
            interval=0.1,
        )
        assert ready, self.output()
        assert self.process.poll() is None, self.output()
        # Kills the mutation "CONSUMER ignored" in a child configured through the environment.
        consumer = f'mini_scan_consumer_info{{consumer="{self.consumer}"}}'
        assert metric(self.metrics_port, consumer) == 1, self.output()

    def signal(self, number: int) -> None:
        self.process.send_signal(number)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def output(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        lines = self.output().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.wait(10)


def observations(count: int, keys: int, seed: int = 1) -> list[Observation]:
    rng = random.Random(seed)
    return [
        Observation(
            f"1.1.1.{rng.randrange(keys)}",
            443,
            "HTTP",
            NOW - rng.randrange(100_000),
            f"service response: {rng.randrange(100)}",
        )
        for _ in range(count)
    ]


def publish_observations(pipeline, items: list[Observation]) -> None:
    pipeline.publish(
        scan(o.ip, o.port, o.service, o.timestamp, o.response, version=1 + i % 2)
        for i, o in enumerate(items)
    )


def reaches_oracle(pipeline, items: list[Observation], timeout: float = 30) -> bool:
    expected = expected_rows(items)
    return wait_until(
        lambda: stored_rows(pipeline.rows()) == expected, timeout=timeout, interval=0.2
    )
