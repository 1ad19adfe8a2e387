"""Where messages come from and how they are settled: the protocols both consumers implement
(the batch-native streaming pull and the client library's `subscribe()`), so that decoding,
batching, committing and dead-lettering are written once."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

from processor.pipeline.messages import Received


class Acknowledger(Protocol):
    """Ends messages' leases: `ack` once they are committed or dead-lettered, `nack` to hand
    them back to Pub/Sub for redelivery (to this or another processor)."""

    def ack(self, messages: Sequence[Received]) -> None: ...

    def nack(self, messages: Sequence[Received]) -> None: ...


class Source(Acknowledger, Protocol):
    """Where deliveries come from; it also settles them (ack, nack)."""

    failed: threading.Event  # set when a stream ended for good (not by close())

    def start(self) -> None: ...

    def streams_open(self) -> bool:
        """At least one stream can deliver (open, and not known to be deaf)."""

    def alive(self) -> bool:
        """Every thread the source runs is running (or was stopped on purpose)."""

    def weigh(self, weights: Sequence[tuple[Received, int]]) -> None:
        """Count, beside each held message's data, the bytes its decoded form takes."""

    def pause(self) -> None:
        """Close the streams but keep the leases of what is held."""

    def resume(self) -> None:
        """Open the streams again after `pause()`."""

    def close(self, timeout: float) -> None: ...
