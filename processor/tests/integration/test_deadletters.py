"""Dead letters that would not fit: a rejected message near Pub/Sub's size limit, or one that
already carries close to 100 attributes, is still dead-lettered once and acked."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from google.pubsub_v1 import types as pubsub_types

from emulator import Emulator
from emulator.testing import free_port, wait_until
from processor.pipeline.deadletter import MAX_ATTRIBUTES, MAX_REQUEST_BYTES, fit
from processor.tests.helpers.pipeline import Pipeline, metric

TOPIC = "projects/test-project/topics/scan-dlq"
REASON = {
    "reason": "invalid_json",
    "error": "x" * 200,
    "source_subscription": "projects/test-project/subscriptions/scan-sub",
    "source_message_id": "1234567890",
    "source_publish_time": "2026-11-29T15:00:00.123456+00:00",
}


def request_bytes(topic: str, data: bytes, attributes: dict[str, str]) -> int:
    """The protobuf library's own size of the publish request: the ground truth."""
    message = pubsub_types.PubsubMessage(data=data, attributes=attributes)
    request = pubsub_types.PublishRequest(topic=topic, messages=[message])
    return pubsub_types.PublishRequest.pb(request).ByteSize()


def largest_whole_data(topic: str, attributes: dict[str, str]) -> int:
    """The longest data whose copy (with these attributes) fits in one publish request."""
    n = MAX_REQUEST_BYTES - request_bytes(topic, b"", attributes)
    while request_bytes(topic, b"x" * n, attributes) > MAX_REQUEST_BYTES:
        n -= 1
    return n


def test_a_copy_that_fits_exactly_is_whole_and_one_byte_more_is_truncated_with_its_digest():
    original = {"origin": "scanner-7"}
    n = largest_whole_data(TOPIC, original | REASON)
    # Given data that fits to the byte with the reason attributes
    data, attributes = fit(TOPIC, b"x" * n, original, REASON)
    # Then the copy is the original, whole
    assert data == b"x" * n
    assert attributes == original | REASON
    # And one byte more is cut to fit, saying what it was
    longer = b"x" * n + b"y"
    data, attributes = fit(TOPIC, longer, original, REASON)
    assert request_bytes(TOPIC, data, attributes) <= MAX_REQUEST_BYTES
    assert longer.startswith(data)
    assert len(data) > n - 1000
    assert attributes["truncated"] == "true"
    assert attributes["original_size"] == str(len(longer))
    assert attributes["original_sha256"] == hashlib.sha256(longer).hexdigest()
    assert attributes.items() >= (original | REASON).items()


def test_a_message_with_100_attributes_keeps_its_reason_and_says_how_many_were_dropped():
    original = {f"key-{i:03d}": "v" * 1024 for i in range(MAX_ATTRIBUTES)}
    data, attributes = fit(TOPIC, b"{not json", original, REASON)
    assert data == b"{not json"
    assert len(attributes) <= MAX_ATTRIBUTES
    assert attributes.items() >= REASON.items()
    kept = [key for key in attributes if key.startswith("key-")]
    assert kept == sorted(original)[: len(kept)]
    assert attributes["dropped_attributes"] == str(MAX_ATTRIBUTES - len(kept))
    assert request_bytes(TOPIC, data, attributes) <= MAX_REQUEST_BYTES


def test_oversized_copies_are_dead_lettered_once_and_acked(
    our_emulator: Emulator, emulator_host: str, make_pipeline: Callable[..., Pipeline]
) -> None:
    # Given a rejected message as large as Pub/Sub accepts, and one with 100 attributes
    port = free_port()
    pipeline = make_pipeline(metrics_port=port)
    topic = pipeline.settings.topic_path
    big = b"[" * largest_whole_data(topic, {})
    many = {f"key-{i:03d}": "v" for i in range(MAX_ATTRIBUTES)}
    stop = pipeline.start_processor()
    pipeline.publish([big])
    pipeline.publish([b"{not json"], **many)
    # Then each reaches the dead-letter topic once, cut to fit, and is acked, not redelivered
    letters = pipeline.dead_letters(expected=2, timeout=60)
    assert len(letters) == 2
    by_size = sorted(letters, key=lambda m: len(m.data))
    small, large = by_size
    assert small.attributes["reason"] == "invalid_json"
    assert len(small.attributes) <= MAX_ATTRIBUTES
    assert small.attributes["dropped_attributes"] == str(
        MAX_ATTRIBUTES - sum(key.startswith("key-") for key in small.attributes)
    )
    assert large.attributes["truncated"] == "true"
    assert large.attributes["original_size"] == str(len(big))
    assert large.attributes["original_sha256"] == hashlib.sha256(big).hexdigest()
    assert big.startswith(large.data)
    # The acks reached Pub/Sub: nothing left leased or ready on the subscription
    assert wait_until(lambda: pipeline.backlog(our_emulator) == (0, 0), timeout=10)
    assert metric(port, "mini_scan_messages_acked_total") == 2
    assert metric(port, "mini_scan_messages_nacked_total") == 0
    assert metric(port, "mini_scan_messages_received_total") == 2
    assert stop() == 0
    assert pipeline.dead_letters(expected=1, timeout=2) == []


def test_a_publisher_cannot_forge_the_dead_letter_attributes(
    emulator_host: str, make_pipeline: Callable[..., Pipeline]
) -> None:
    # Given a malformed message whose publisher set the reserved attributes itself
    pipeline = make_pipeline()
    forged = {
        "reason": "invalid_port",
        "error": "forged",
        "truncated": "true",
        "original_sha256": "0" * 64,
        "CloudPubSubDeadLetterSourceDeliveryCount": "20",
    }
    stop = pipeline.start_processor()
    pipeline.publish([b"{not json"], origin="scanner-7", **forged)
    # Then its dead-letter copy carries the processor's reason only, and the publisher's own
    # attributes. Catches: the original attributes copied over unfiltered (`truncated` and the
    # policy prefix would survive; `dlq replay` would then skip or mislabel it).
    (letter,) = pipeline.dead_letters(expected=1, timeout=30)
    assert letter.attributes["reason"] == "invalid_json"
    assert letter.attributes["error"] != "forged"
    assert letter.attributes["origin"] == "scanner-7"
    assert not {"truncated", "original_sha256"} & set(letter.attributes)
    assert not any(key.startswith("CloudPubSub") for key in letter.attributes)
    assert stop() == 0
