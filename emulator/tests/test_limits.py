"""Publish limits: exactly at each of Pub/Sub's limits is accepted, one over is refused, with the
service's status code and wording, through the real client's GAPIC layer and through REST."""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable
from typing import Any

import pytest
from google.api_core import exceptions
from google.cloud import pubsub_v1
from google.pubsub_v1.services.publisher import PublisherClient as GapicPublisherClient

from emulator.tests.helpers import publish_all, unique

Message = pubsub_v1.types.PubsubMessage

# Pull(return_immediately=True) is deprecated but still the plain way to ask "is anything there?".
pytestmark = pytest.mark.filterwarnings("ignore:The return_immediately flag:DeprecationWarning")


def data_for_request_size(topic: str, total: int) -> bytes:
    """Data that makes a one-message PublishRequest to `topic` exactly `total` bytes long."""
    length = total
    for _ in range(5):
        request = pubsub_v1.types.PublishRequest(
            topic=topic, messages=[Message(data=b"x" * length)]
        )
        size = request._pb.ByteSize()
        if size == total:
            return b"x" * length
        length -= size - total
    raise AssertionError(f"no data length gives a {total}-byte request")


def attrs(n: int) -> dict[str, str]:
    return {f"k{i}": "v" for i in range(n)}


# (case, messages for `topic`, None if accepted else (exception, text the error must contain))
CASES: list[tuple[str, Callable[[str], list[Any]], tuple[type, str] | None]] = [
    ("1000 messages", lambda t: [Message(data=b"m")] * 1000, None),
    (
        "1001 messages",
        lambda t: [Message(data=b"m")] * 1001,
        (exceptions.InvalidArgument, "message_count is too large. You passed 1001"),
    ),
    ("no messages", lambda t: [], (exceptions.InvalidArgument, "message_count is too small")),
    (
        "a message with neither data nor attributes",
        lambda t: [Message(data=b"m"), Message()],
        (exceptions.InvalidArgument, "Each message must contain either non-empty data"),
    ),
    ("attributes and no data", lambda t: [Message(attributes={"k": "v"})], None),
    ("100 attributes", lambda t: [Message(data=b"m", attributes=attrs(100))], None),
    (
        "101 attributes",
        lambda t: [Message(data=b"m", attributes=attrs(101))],
        (exceptions.InvalidArgument, "You passed 101 in the request, but the maximum value is 100"),
    ),
    ("a 256-byte key", lambda t: [Message(data=b"m", attributes={"k" * 256: "v"})], None),
    ("a 256-byte key of 2-byte characters", lambda t: [Message(attributes={"é" * 128: "v"})], None),
    (
        "a 257-byte key",
        lambda t: [Message(data=b"m", attributes={"k" * 257: "v"})],
        (exceptions.InvalidArgument, "has a key that is too long. The length is 257"),
    ),
    (
        "a 258-byte key of 129 characters",
        lambda t: [Message(attributes={"é" * 129: "v"})],
        (exceptions.InvalidArgument, "has a key that is too long. The length is 258"),
    ),
    ("a 1024-byte value", lambda t: [Message(data=b"m", attributes={"k": "v" * 1024})], None),
    (
        "a 1025-byte value",
        lambda t: [Message(data=b"m", attributes={"k": "v" * 1025})],
        (exceptions.InvalidArgument, 'The attribute "k" in the request has a value that is too'),
    ),
    (
        "a 1026-byte value of 513 characters",
        lambda t: [Message(data=b"m", attributes={"k": "é" * 513})],
        (exceptions.InvalidArgument, "The length is 1026 characters, but the maximum allowed"),
    ),
    (
        "two ordering keys in one request",
        lambda t: [Message(data=b"a", ordering_key="a"), Message(data=b"b", ordering_key="b")],
        (exceptions.FailedPrecondition, "must all have the same ordering key"),
    ),
    (
        "a 10,000,000-byte request",
        lambda t: [Message(data=data_for_request_size(t, 10_000_000))],
        None,
    ),
    (
        "a 10,000,001-byte request",
        lambda t: [Message(data=data_for_request_size(t, 10_000_001))],
        (exceptions.InvalidArgument, "request_size is too large. You passed 10000001"),
    ),
    (
        "a 10,485,761-byte request",
        lambda t: [Message(data=data_for_request_size(t, 10_485_761))],
        (exceptions.InvalidArgument, "Request payload size exceeds the limit: 10485760 bytes."),
    ),
]


@pytest.fixture
def gapic_publish(publisher: pubsub_v1.PublisherClient) -> Callable[..., Any]:
    """The GAPIC Publish call itself: the high-level publish() batches and checks sizes first."""
    return functools.partial(GapicPublisherClient.publish, publisher)


@pytest.mark.parametrize(("case", "messages", "refused"), CASES, ids=[c[0] for c in CASES])
def test_publish_accepts_up_to_each_limit_and_refuses_one_over_it(
    gapic_publish, subscriber, topic, make_subscription, case, messages, refused
):
    sub = make_subscription()
    batch = messages(topic)

    if refused is None:
        ids = gapic_publish(topic=topic, messages=batch, timeout=30).message_ids
        assert len(ids) == len(batch)
    else:
        error, text = refused
        with pytest.raises(error) as raised:
            gapic_publish(topic=topic, messages=batch, timeout=30)
        assert text in raised.value.message
        pulled = subscriber.pull(subscription=sub, max_messages=10, return_immediately=True)
        assert list(pulled.received_messages) == [], "a refused request publishes nothing"


def test_the_high_level_publisher_gets_a_message_exactly_at_the_request_limit_through(
    emulator, publisher, topic, make_subscription
):
    # The client refuses one byte more itself (MessageTooLargeError): its limit is the service's.
    sub = make_subscription()

    publish_all(publisher, topic, data_for_request_size(topic, 10_000_000))

    assert emulator.broker.subscription(sub).backlog() == (1, 0)


def test_rest_publish_applies_the_same_limits(rest, topic):
    data = base64.b64encode(b"m").decode()

    ok = rest("POST", f"{topic}:publish", {"messages": [{"data": data, "attributes": attrs(100)}]})
    over = rest(
        "POST", f"{topic}:publish", {"messages": [{"data": data, "attributes": attrs(101)}]}
    )

    assert ok[0] == 200
    assert over[0] == 400
    assert over[1]["error"]["status"] == "INVALID_ARGUMENT"
    assert "maximum value is 100" in over[1]["error"]["message"]


def test_a_rest_body_over_10_mib_is_refused_by_the_front_end(rest, topic):
    # 7.9 MB of data is 10.5 MB of base64: over the front end's cap though the message would fit.
    data = base64.b64encode(b"x" * 7_900_000).decode()

    status, body = rest("POST", f"{topic}:publish", {"messages": [{"data": data}]})

    assert status == 400
    assert body["error"] == {
        "code": 400,
        "message": "Request payload size exceeds the limit: 10485760 bytes.",
        "status": "INVALID_ARGUMENT",
    }


def test_a_topic_that_does_not_exist_is_not_found_even_for_a_valid_request(gapic_publish):
    with pytest.raises(exceptions.NotFound):
        gapic_publish(topic=unique("topics"), messages=[Message(data=b"m")], timeout=10)
