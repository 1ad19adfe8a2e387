"""The records a message travels in: `Received` as delivered, `Held` once decoded and waiting
for its commit.

Both consumers (the batch-native one and the client's `subscribe()`) produce the same records,
so decoding, batching, committing and dead-lettering are written once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from processor.schema import Observation


class Received(NamedTuple):
    """One delivered message: what acking, dead-lettering and the lag metric need."""

    ack_id: str
    message_id: str
    data: bytes
    attributes: Mapping[str, str]
    publish_time: float  # Unix seconds
    handle: Any = None  # the client library's Message (CONSUMER=client); None otherwise


class Held(NamedTuple):
    """A message whose row is not committed yet: it must not be acked before it is."""

    received: Received
    observation: Observation
