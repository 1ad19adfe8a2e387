"""What a consumer hands to the shared path: `Received` messages, and the `Acknowledger` that
settles them once the writer or the dead letters have decided.

Both consumers (the batch-native one and the client's `subscribe()`) produce the same records,
so decoding, batching, committing and dead-lettering are written once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

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


class Acknowledger(Protocol):
    """Ends messages' leases: `ack` once they are committed or dead-lettered, `nack` to hand
    them back to Pub/Sub for redelivery (to this or another processor)."""

    def ack(self, messages: Sequence[Received]) -> None: ...

    def nack(self, messages: Sequence[Received]) -> None: ...
