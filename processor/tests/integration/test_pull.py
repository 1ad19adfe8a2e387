"""The batch-native consumer's own duties (CONSUMER=batch): reopening streams with backoff under
a stable client id, requests within Pub/Sub's limits, flow control, and the subscriptions it
refuses or takes as they are. Where both consumers owe the same, both are tested."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

import grpc
import pytest
from google.cloud import pubsub_v1
from google.pubsub_v1 import types as pubsub_types

from emulator import Emulator
from emulator.faults import Faults
from emulator.testing import free_port, wait_until
from processor.runtime.pubsub import MAX_IDS_PER_REQUEST, MAX_REQUEST_BYTES, ack_id_chunks
from processor.schema import Observation
from processor.tests.helpers.chaos import SqliteWriteLock
from processor.tests.helpers.pipeline import (
    NOW,
    Pipeline,
    http_get,
    metric,
    observations,
    publish_observations,
    reaches_oracle,
    unique,
)

batch_only = pytest.mark.parametrize("consumer", ["batch"])


def acknowledge_request_bytes(ack_ids: list[str]) -> int:
    request = pubsub_types.AcknowledgeRequest(
        subscription="projects/test-project/subscriptions/" + "s" * 255, ack_ids=ack_ids
    )
    return pubsub_types.AcknowledgeRequest.pb(request).ByteSize()


@pytest.mark.parametrize("id_bytes", [20, 176, 400])
def test_acks_leave_in_requests_within_pubsubs_limits_and_in_order(id_bytes: int) -> None:
    ack_ids = [f"{i:0{id_bytes}d}" for i in range(6000)]
    chunks = list(ack_id_chunks(ack_ids))
    assert [ack_id for chunk in chunks for ack_id in chunk] == ack_ids
    assert all(len(chunk) <= MAX_IDS_PER_REQUEST for chunk in chunks)
    assert all(acknowledge_request_bytes(chunk) <= MAX_REQUEST_BYTES for chunk in chunks)
    # As few requests as the limits allow: only the last one is short
    assert all(
        len(chunk) == MAX_IDS_PER_REQUEST
        or acknowledge_request_bytes([*chunk, ack_ids[0]]) > MAX_REQUEST_BYTES - 4096
        for chunk in chunks[:-1]
    )


@batch_only
def test_a_stream_the_service_keeps_ending_is_reopened_with_backoff_under_one_client_id(
    our_emulator: Emulator,
    emulator_host: str,
    faults: Faults,
    make_pipeline: Callable[..., Pipeline],
) -> None:
    # Given a service that ends every stream at once with UNAVAILABLE
    our_emulator.faults.fail_next("StreamingPull", n=10_000, code=grpc.StatusCode.UNAVAILABLE)
    port = free_port()
    pipeline = make_pipeline(metrics_port=port, streams=1)
    stop = pipeline.start_processor()
    # Then the processor reopens it, but with growing pauses: a handful of attempts in 4 s, not
    # hundreds (backoff from 0.1 s, doubling, with jitter)
    assert wait_until(lambda: metric(port, "mini_scan_stream_reconnects_total") >= 2, timeout=20)
    first = metric(port, "mini_scan_stream_reconnects_total")
    time.sleep(4)  # pacing: counting attempts over a window
    assert metric(port, "mini_scan_stream_reconnects_total") - first <= 12
    # And when the service answers again, the stream opens and messages flow
    our_emulator.faults.clear()
    items = observations(200, keys=100, seed=41)
    publish_observations(pipeline, items)
    assert reaches_oracle(pipeline, items, timeout=40)
    # And a dropped stream comes back with the client id it had
    state = our_emulator.broker.subscription(pipeline.settings.subscription_path)
    client_ids = {stream.client_id for stream in state._streams}
    our_emulator.drop_streams()
    assert wait_until(lambda: state.stream_count() == 1, timeout=20)
    assert wait_until(lambda: http_get(port, "/readyz")[0] == 200, timeout=20)
    assert {stream.client_id for stream in state._streams} == client_ids
    assert stop() == 0


def test_while_the_database_is_stalled_no_more_than_the_flow_control_limit_is_taken(
    emulator_host: str, make_pipeline: Callable[..., Pipeline]
) -> None:
    # (This bound is also the per-stream flow control the emulator enforces: what it guards is
    # that the processor asks for it. The processor's own gate is the next test's subject.)
    # Given a processor allowed 50 unacked messages per stream, on 2 streams
    port = free_port()
    pipeline = make_pipeline(metrics_port=port, streams=2, max_messages=50, batch_size=20)
    stop = pipeline.start_processor()
    assert wait_until(lambda: http_get(port, "/readyz")[0] == 200, timeout=20)
    first = observations(10, keys=10, seed=42)
    publish_observations(pipeline, first)
    assert wait_until(lambda: metric(port, "mini_scan_messages_acked_total") >= 10, timeout=20)
    lock = SqliteWriteLock(pipeline.settings.database_url.removeprefix("sqlite:///"))
    lock.begin()
    try:
        # When 2,000 messages arrive while nothing can be committed
        items = observations(2000, keys=250, seed=43)
        publish_observations(pipeline, items)
        assert wait_until(lambda: metric(port, "mini_scan_messages_received_total") >= 60)
        # Then it holds at most its limit, however long the stall
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:  # an invariant held over time
            assert metric(port, "mini_scan_messages_received_total") <= 10 + 2 * 50
            time.sleep(0.2)
    finally:
        lock.end()
        lock.close()
    # And everything is stored once the database is back
    assert reaches_oracle(pipeline, first + items, timeout=60)
    assert stop() == 0


def test_a_subscription_with_message_ordering_is_consumed_to_the_oracle(
    emulator_host: str, make_pipeline: Callable[..., Pipeline]
) -> None:
    # Given a subscription with message ordering, and scans published with ordering keys
    pipeline = make_pipeline()
    ordered = unique("scan-sub-ordered")
    pubsub_v1.SubscriberClient().create_subscription(
        request={
            "name": f"projects/{pipeline.settings.project}/subscriptions/{ordered}",
            "topic": pipeline.settings.topic_path,
            "enable_message_ordering": True,
        }
    )
    publisher = pubsub_v1.PublisherClient(
        publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True)
    )
    items = observations(300, keys=30, seed=44)
    futures = [
        publisher.publish(
            pipeline.settings.topic_path, body, ordering_key=body.split(b'"')[3].decode()
        )
        for body in _bodies(items)
    ]
    for future in futures:
        future.result(timeout=30)
    # When the processor consumes it
    stop = pipeline.start_processor(pubsub_subscription=ordered)
    # Then the table is the oracle's
    assert reaches_oracle(pipeline, items, timeout=40)
    assert stop() == 0


@batch_only
def test_a_subscription_with_exactly_once_delivery_is_refused_in_one_line(
    official_emulator_host: str, consumer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a subscription with exactly-once delivery (Google's emulator has it; ours does not)
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", official_emulator_host)
    project, topic, subscription = "mini-scan-test", unique("scan-topic"), unique("scan-sub")
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic_path = publisher.create_topic(name=f"projects/{project}/topics/{topic}").name
    subscriber.create_subscription(
        request={
            "name": f"projects/{project}/subscriptions/{subscription}",
            "topic": topic_path,
            "enable_exactly_once_delivery": True,
        }
    )
    # When the processor starts on it with the batch consumer
    env = os.environ | {
        "PUBSUB_PROJECT_ID": project,
        "PUBSUB_SUBSCRIPTION": subscription,
        "CONSUMER": consumer,
        "METRICS_PORT": "0",
        "LOG_FORMAT": "json",
    }
    done = subprocess.run(
        [sys.executable, "-m", "processor"], env=env, capture_output=True, text=True, timeout=60
    )
    # Then it refuses at once, saying why and what to do, in one line
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "exactly-once delivery" in lines[0]
    assert "CONSUMER=client" in lines[0]


def _bodies(items: list) -> list[bytes]:
    from processor.tests.helpers.pipeline import scan

    return [scan(o.ip, o.port, o.service, o.timestamp, o.response) for o in items]


@batch_only  # the client library's flow control weighs raw bytes only
def test_the_processor_gate_counts_decoded_sizes_where_the_stream_would_deliver_more(
    our_emulator: Emulator, emulator_host: str, make_pipeline: Callable[..., Pipeline]
) -> None:
    """Kills: `Leases.wait_for_room` not waiting, and `Processor.handle` not weighing large
    decoded responses. The emulator's cap counts raw bytes and would deliver 7 of the 8."""
    # Given one stream allowed 1 MiB, and responses of 100,001 characters that take 400 kB
    # (one character outside Latin-1 makes CPython store the whole string at 4 bytes a char)
    port = free_port()
    pipeline = make_pipeline(metrics_port=port, streams=1, max_bytes=1024 * 1024)
    stop = pipeline.start_processor()
    assert wait_until(lambda: http_get(port, "/readyz")[0] == 200, timeout=20)
    lock = SqliteWriteLock(pipeline.settings.database_url.removeprefix("sqlite:///"))
    lock.begin()
    try:
        # When 8 such messages (v1: 133 kB base64) arrive while nothing can be committed, the
        # first two one at a time (each delivered before the next, so each a response of its own)
        wide = "a" * 100_000 + "\U0001f600"
        items = [Observation(f"1.2.3.{i}", 80, "HTTP", NOW, wide) for i in range(8)]
        received = lambda: metric(port, "mini_scan_messages_received_total")  # noqa: E731
        for n, item in enumerate(items[:2], start=1):
            publish_observations(pipeline, [item])
            assert wait_until(lambda n=n: received() == n, timeout=10)
        publish_observations(pipeline, items[2:])
        # Then the processor, holding 1.07 MB weighed (270 kB raw), takes no more
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # an invariant held over time
            assert received() == 2
            time.sleep(0.2)
    finally:
        lock.end()
        lock.close()
    # And everything is stored once the database is back
    assert reaches_oracle(pipeline, items, timeout=60)
    assert stop() == 0
