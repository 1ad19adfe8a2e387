"""Pub/Sub's publish limits, refused with the status and wording of the real service.

The rule this module owns: a Publish request that breaks any limit publishes nothing, whether it
came over gRPC or REST, and the dead-letter forward of a message is held to the same limits.

The numbers are Google's (https://cloud.google.com/pubsub/quotas#resource_limits). The wording of
each error is the service's as quoted in public issue threads, named beside each check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from emulator.errors import FailedPrecondition, InvalidArgument

# Google's API front end refuses bodies above 10 MiB before Pub/Sub sees them (gRPC and REST):
# "Request payload size exceeds the limit: 10485760 bytes." (apache/beam#19384, #23022).
MAX_PAYLOAD_BYTES = 10 * 1024 * 1024
# "Publish request: 10 MB (total size)"; the Python client checks the same 10,000,000 bytes of
# serialized PublishRequest. A message (data and attributes) can be no larger than its request.
MAX_REQUEST_BYTES = 10_000_000
MAX_MESSAGES = 1000
MAX_ATTRIBUTES = 100
MAX_KEY_BYTES = 256
MAX_VALUE_BYTES = 1024

_QUOTAS = "Refer to https://cloud.google.com/pubsub/quotas for more information."


def _too_large(name: str, value: int, limit: int) -> InvalidArgument:
    # The service's template (google-cloud-python#5898, google-cloud-java#4757; those years'
    # service swapped the two placeholders, later texts of the same family have them in order).
    return InvalidArgument(
        f"The value for {name} is too large. You passed {value} in the request, "
        f"but the maximum value is {limit}."
    )


def check_payload(nbytes: int) -> None:
    """The front end's cap on one request body, whatever the RPC."""
    if nbytes > MAX_PAYLOAD_BYTES:
        raise InvalidArgument(f"Request payload size exceeds the limit: {MAX_PAYLOAD_BYTES} bytes.")


def request_bytes(topic: str, messages: Sequence[Any]) -> int:
    """The serialized size of PublishRequest(topic, messages), without building it."""
    return _field(len(topic.encode())) + sum(_field(m.ByteSize()) for m in messages)


def _field(length: int) -> int:
    """Bytes of one length-delimited protobuf field (tag < 16) whose payload is `length` long."""
    return 1 + max(1, (length.bit_length() + 6) // 7) + length


def check_publish(messages: Sequence[Any], nbytes: int) -> None:
    """Raise what the service raises for this request; `nbytes` is its serialized size."""
    if not messages:
        # google-api-nodejs-client#519.
        raise InvalidArgument(
            "The value for message_count is too small. You passed 0 in the request, "
            "but the minimum value is 1."
        )
    if len(messages) > MAX_MESSAGES:
        raise _too_large("message_count", len(messages), MAX_MESSAGES)
    if nbytes > MAX_REQUEST_BYTES:
        raise _too_large("request_size", nbytes, MAX_REQUEST_BYTES)
    if len({m.ordering_key for m in messages}) > 1:
        # Answered by the service to a client that mixed keys (yoshidan/google-cloud-rust#226).
        raise FailedPrecondition(
            "In a single publish request, all messages must have no ordering key or they must "
            "all have the same ordering key."
        )
    for m in messages:
        _check_message(m)


def _check_message(m: Any) -> None:
    if not m.data and not m.attributes:
        # The second sentence is the Pub/Sub team's (google-cloud-ruby#1535).
        raise InvalidArgument(
            "One or more messages in the publish request is empty. Each message must contain "
            "either non-empty data, or at least one attribute."
        )
    if len(m.attributes) > MAX_ATTRIBUTES:
        # No public quote of this one was found; it follows the service's generic template.
        raise _too_large("attribute_count", len(m.attributes), MAX_ATTRIBUTES)
    for key, value in m.attributes.items():
        # Limits are in bytes, though the service's text says characters (java-pubsub#2312).
        if (size := len(key.encode())) > MAX_KEY_BYTES:
            # The service leaves the key's name empty here (java-pubsub#2312).
            raise InvalidArgument(
                'The attribute "" in the request has a key that is too long. The length is '
                f"{size} characters, but the maximum allowed is {MAX_KEY_BYTES}. {_QUOTAS}"
            )
        if (size := len(value.encode())) > MAX_VALUE_BYTES:
            # snowplow/enrich#485, blockchain-etl/ethereum-etl#472.
            raise InvalidArgument(
                f'The attribute "{key}" in the request has a value that is too long. The length '
                f"is {size} characters, but the maximum allowed is {MAX_VALUE_BYTES}. {_QUOTAS}"
            )
