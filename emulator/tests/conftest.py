"""Fixtures: one in-process emulator per session, real google-cloud-pubsub clients per test."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from google.cloud import pubsub_v1

from emulator import Emulator
from emulator.tests.helpers import unique


@pytest.fixture(scope="session")
def emulator() -> Iterator[Emulator]:
    with Emulator(port=0, rest_port=0) as emu:
        yield emu


@pytest.fixture(autouse=True)
def _clean_faults(emulator: Emulator) -> Iterator[None]:
    yield
    emulator.faults.clear()


@pytest.fixture
def emulator_env(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator.address)
    return emulator.address


@pytest.fixture
def publisher(emulator_env: str) -> pubsub_v1.PublisherClient:
    return pubsub_v1.PublisherClient()


@pytest.fixture
def ordered_publisher(emulator_env: str) -> pubsub_v1.PublisherClient:
    options = pubsub_v1.types.PublisherOptions(enable_message_ordering=True)
    return pubsub_v1.PublisherClient(publisher_options=options)


@pytest.fixture
def subscriber(emulator_env: str) -> Iterator[pubsub_v1.SubscriberClient]:
    client = pubsub_v1.SubscriberClient()
    yield client
    client.close()


@pytest.fixture
def topic(publisher: pubsub_v1.PublisherClient) -> str:
    return publisher.create_topic(name=unique("topics")).name


@pytest.fixture
def make_subscription(subscriber: pubsub_v1.SubscriberClient, topic: str) -> Callable[..., str]:
    """Create a subscription on `topic` (or `of=`) with extra Subscription fields."""

    def make(of: str | None = None, **settings: Any) -> str:
        request = {"name": unique("subscriptions"), "topic": of or topic, **settings}
        return subscriber.create_subscription(request=request).name

    return make


@pytest.fixture
def subscribe(subscriber: pubsub_v1.SubscriberClient) -> Iterator[Callable[..., Any]]:
    """Start a streaming pull with a callback; every future is cancelled at teardown."""
    futures: list[Any] = []

    def start(subscription: str, callback: Callable[[Any], None], **kwargs: Any) -> Any:
        future = subscriber.subscribe(subscription, callback, **kwargs)
        futures.append(future)
        return future

    yield start
    for future in futures:
        future.cancel()
    for future in futures:
        # A cancelled future may report how its stream ended; that is not this test's concern.
        with contextlib.suppress(Exception):
            future.result(timeout=10)


@pytest.fixture
def rest(emulator: Emulator) -> Callable[..., tuple[int, Any]]:
    """Call the REST front: rest(method, "projects/...", json_body) -> (HTTP status, JSON)."""
    base = f"http://{emulator.rest_address}/v1/"

    def call(method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(  # noqa: S310 - a local http URL we built
            base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    return call
