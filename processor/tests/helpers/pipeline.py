"""The test pipeline: a topic, subscription and dead-letter topic per test, processors run in
this process or as children, and the probes tests read them with (rows, metrics, endpoints)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from google.cloud import pubsub_v1

from emulator import Emulator
from emulator.testing import (
    OfficialEmulatorUnavailable,
    free_port,
    official_emulator,
    wait_until,
)
from processor.commands.process import run
from processor.config import ProcessorSettings
from processor.runtime.pubsub import subscriber_client
from processor.schema import Observation
from processor.storage import Repository, open_engine
from processor.tests.helpers.oracle import expected_rows, stored_rows

NOW = int(time.time())


@pytest.fixture(scope="session")
def our_emulator() -> Iterator[Emulator]:
    with Emulator(port=0) as emulator:
        yield emulator


@pytest.fixture(scope="session")
def official_emulator_host() -> Iterator[str]:
    try:
        with official_emulator() as host:
            yield host
    except OfficialEmulatorUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def emulator_host(our_emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", our_emulator.address)
    return our_emulator.address


@pytest.fixture(params=["ours", "official"])
def any_emulator_host(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Happy-path tests run on our emulator and, where installed, on Google's."""
    if request.param == "ours":
        host = request.getfixturevalue("our_emulator").address
    else:
        host = request.getfixturevalue("official_emulator_host")
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", host)
    return host


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
        """Run a processor in a thread; returns a function that stops it and gives its exit code."""
        settings = self.settings.model_copy(update=overrides)
        stop, exit_code = threading.Event(), []
        thread = threading.Thread(
            target=lambda: exit_code.append(run(settings, stop)), name="test-processor"
        )
        thread.start()
        self._running.append((thread, stop, exit_code))

        def stop_it() -> int:
            stop.set()
            thread.join(timeout=30)
            assert not thread.is_alive(), "processor did not stop"
            return exit_code[0]

        return stop_it

    def stop_all(self) -> None:
        for thread, stop, _ in self._running:
            stop.set()
            thread.join(timeout=30)

    def repository(self) -> Repository:
        return Repository(open_engine(self.settings.database_url))

    def rows(self) -> list[Any]:
        repository = self.repository()
        try:
            return repository.rows()
        except Exception:  # the table may not exist yet
            return []
        finally:
            repository.engine.dispose()

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


def scan(
    ip: str, port: int, service: str, timestamp: int, response: str, version: int = 2
) -> bytes:
    """A wire message, built by hand (not through `encode`) so tests check the real format."""
    if version == 1:
        import base64

        data = {"response_bytes_utf8": base64.b64encode(response.encode()).decode()}
    else:
        data = {"response_str": response}
    return json.dumps(
        {
            "ip": ip,
            "port": port,
            "service": service,
            "timestamp": timestamp,
            "data_version": version,
            "data": data,
        }
    ).encode()


def http_get(port: int, path: str) -> tuple[int, str]:
    """Status and body of a GET on the metrics server; (0, "") when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def metric(port: int, name: str) -> float:
    """The value of one sample on /metrics (0 when absent); a name without labels sums every
    labelled series of it (`mini_scan_stream_reconnects_total` over its causes)."""
    _, body = http_get(port, "/metrics")
    prefixes = (name + " ",) if "{" in name else (name + " ", name + "{")
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(prefixes)
    )


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
