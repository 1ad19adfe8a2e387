"""Fixtures for processor tests: a real Pub/Sub emulator (ours, and Google's where installed),
real databases, and a pipeline (topic, subscription, dead-letter topic) per test. The helpers
the tests share live in helpers/."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from google.cloud import pubsub_v1

from emulator import Emulator
from emulator.faults import Faults
from emulator.testing import official_emulator_for_tests
from processor.commands.setup import ensure_resources
from processor.config import ProcessorSettings, SetupSettings
from processor.tests.helpers.pipeline import Pipeline, ProcessorProcess, unique


@pytest.fixture(scope="session")
def our_emulator() -> Iterator[Emulator]:
    with Emulator(port=0) as emulator:
        yield emulator


@pytest.fixture
def faults(our_emulator: Emulator) -> Iterator[Faults]:
    """The session emulator's fault injection, cleared before and after the test so no fault
    leaks into another."""
    our_emulator.faults.clear()
    yield our_emulator.faults
    our_emulator.faults.clear()


@pytest.fixture(scope="session")
def official_emulator_host() -> Iterator[str]:
    with official_emulator_for_tests() as host:  # skips locally when missing, fails in CI
        yield host


@pytest.fixture
def emulator_host(our_emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", our_emulator.address)
    return our_emulator.address


@pytest.fixture(params=["ours", "official"])
def any_emulator_host(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Happy-path tests run on our emulator and on Google's (skipped locally where Google's is
    not installed, failing in CI)."""
    if request.param == "ours":
        host = request.getfixturevalue("our_emulator").address
    else:
        host = request.getfixturevalue("official_emulator_host")
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", host)
    return host


@pytest.fixture(params=["batch", "client"])
def consumer(request: pytest.FixtureRequest) -> str:
    """Every test that runs a processor runs once per consumer: the batch-native default and
    the client library's `subscribe()` (CONSUMER=client)."""
    return request.param


@pytest.fixture
def make_pipeline(tmp_path, consumer: str) -> Iterator[Callable[..., Pipeline]]:
    """A fresh topic, subscription, dead-letter topic and subscription, and settings for them
    (for this test's consumer); SQLite in the test's directory unless a database URL is given."""
    made: list[Pipeline] = []

    def make(
        database_url: str | None = None, setup: dict[str, Any] | None = None, **overrides: Any
    ) -> Pipeline:
        names = {
            "pubsub_topic": unique("scan-topic"),
            "pubsub_subscription": unique("scan-sub"),
            "pubsub_dead_letter_topic": unique("scan-dlq"),
            "pubsub_dead_letter_subscription": unique("scan-dlq-sub"),
        }
        retry = {"min_retry_backoff": 0.1, "max_retry_backoff": 1.0}
        ensure_resources(SetupSettings(**names, **(retry | (setup or {}))))
        defaults = {
            "database_url": database_url or f"sqlite:///{tmp_path / 'scan_results.db'}",
            "metrics_port": 0,
            "batch_max_wait_ms": 20,
            "startup_timeout": 20,
            "shutdown_grace": 10,
            "consumer": consumer,
        }
        settings = ProcessorSettings(**names, **(defaults | overrides))
        pipeline = Pipeline(settings, pubsub_v1.PublisherClient())
        made.append(pipeline)
        return pipeline

    yield make
    for pipeline in made:
        pipeline.stop_all()


@pytest.fixture
def spawn_processor(tmp_path) -> Iterator[Callable[..., ProcessorProcess]]:
    started: list[ProcessorProcess] = []

    def spawn(pipeline: Pipeline, **env: str) -> ProcessorProcess:
        child = ProcessorProcess(
            pipeline.settings, tmp_path / f"processor-{len(started)}.log", **env
        )
        started.append(child)
        return child

    yield spawn
    for child in started:
        child.stop()
