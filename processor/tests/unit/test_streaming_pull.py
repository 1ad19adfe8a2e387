"""What the batch consumer keeps of a streaming-pull response: each message's own fields, never
a view into the response (which would keep the whole response alive, unseen by flow control)."""

from __future__ import annotations

from google.protobuf.message import Message
from google.pubsub_v1 import types as pubsub_types

from processor.config import ProcessorSettings
from processor.pipeline.leases import Leases
from processor.pipeline.messages import Received
from processor.pipeline.streaming_pull import _Stream
from processor.runtime.metrics import Metrics
from processor.tests.helpers.fakes import RecordingDispatcher


def test_a_delivered_message_keeps_no_view_into_its_response() -> None:
    """Catches `attributes` taken as the response's map (a view holding the response)."""
    # Given a response with a large message and a small one with attributes
    response = pubsub_types.StreamingPullResponse.pb()()
    big = response.received_messages.add(ack_id="a-big")
    big.message.data = b"x" * 1_000_000
    small = response.received_messages.add(ack_id="a-small")
    small.message.data = b"{}"
    small.message.attributes["origin"] = "scanner-7"
    received: list[Received] = []
    settings = ProcessorSettings(
        pubsub_project_id="p",
        pubsub_topic="t",
        pubsub_subscription="s",
        pubsub_dead_letter_topic="d",
    )
    leases = Leases(RecordingDispatcher(), 10, 1000, 10**9, keepalive=lambda: None)
    stream = _Stream(settings, None, Metrics(), leases, received.extend, lambda _: None)  # type: ignore[arg-type]
    # When the stream hands it on
    stream._on_response(response)
    # Then each message's attributes are its own plain mapping, equal to what was sent
    assert [r.ack_id for r in received] == ["a-big", "a-small"]
    assert received[1].attributes == {"origin": "scanner-7"}
    assert received[0].attributes == {}
    for message in received:
        assert type(message.attributes).__module__ in ("builtins", "types")
        assert not isinstance(message.attributes, Message)
        assert isinstance(message.data, bytes)
