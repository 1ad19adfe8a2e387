"""The messages the batch-native consumer holds, the flow-control gate on them, and when their
leases are extended.

The rule it owns: a held message's lease is extended (modify ack deadline) for as long as it is
held, and never after it was acked or handed back. What is decided here is sent by the
dispatcher (`dispatcher.py`); the schedule never waits for a request to be answered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from processor.pipeline.dispatcher import Dispatcher
from processor.pipeline.messages import Received
from processor.runtime.logs import supervised_thread

KEEPALIVE_SECONDS = 30.0  # an empty request on every stream this often keeps idle streams open
RESUME_AT = 0.8  # a paused stream reads again once what is held falls below this share


class Leases:
    """What the consumer holds (ack id -> bytes), the flow-control gate on it, and the one
    thread (`lease-keeper`) that schedules lease extensions and stream keepalives."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        lease_seconds: float,
        max_messages: int,
        max_bytes: int,
        keepalive: Callable[[], None],
    ) -> None:
        self._dispatcher = dispatcher
        self._period = lease_seconds / 3  # a lease is renewed when two thirds of it remain
        self._max_messages, self._max_bytes = max_messages, max_bytes
        self._keepalive = keepalive
        self._held: dict[str, int] = {}
        self._bytes = 0
        self._room = threading.Condition()
        self._closed = threading.Event()
        self._thread = supervised_thread(self._run, "lease-keeper")

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        """The schedule runs (or was closed on purpose)."""
        return self._closed.is_set() or self._thread.is_alive()

    def add(self, messages: Sequence[Received]) -> None:
        """Hold delivered messages: their leases are extended from now on."""
        with self._room:
            held = self._held
            for message in messages:
                held[message.ack_id] = size = len(message.data)
                self._bytes += size

    def weigh(self, weights: Sequence[tuple[Received, int]]) -> None:
        """Add bytes to held messages (their decoded form), counted until they are released."""
        with self._room:
            for message, extra in weights:
                if message.ack_id in self._held:
                    self._held[message.ack_id] += extra
                    self._bytes += extra

    def ack(self, messages: Sequence[Received]) -> None:
        self._dispatcher.ack(self._release(messages))

    def nack(self, messages: Sequence[Received]) -> None:
        self._dispatcher.nack(self._release(messages))

    def wait_for_room(self, stop: threading.Event) -> None:
        """Block a stream while the process holds its limit of messages or bytes, until what it
        holds falls below RESUME_AT of both (local back-pressure beside the server's own)."""
        with self._room:
            if len(self._held) < self._max_messages and self._bytes < self._max_bytes:
                return
            while not stop.is_set() and (
                len(self._held) >= self._max_messages * RESUME_AT
                or self._bytes >= self._max_bytes * RESUME_AT
            ):
                self._room.wait(0.5)

    def below(self, share: float) -> bool:
        """True while what is held is under `share` of both limits."""
        with self._room:
            return (
                len(self._held) < self._max_messages * share
                and self._bytes < self._max_bytes * share
            )

    def __len__(self) -> int:
        with self._room:
            return len(self._held)

    def close(self) -> None:
        """Hand back whatever is still held and stop the schedule (the dispatcher, closed
        after this, sends the nacks)."""
        with self._room:
            left = list(self._held)
            self._held.clear()
            self._bytes = 0
            self._room.notify_all()
        self._closed.set()
        if left:
            self._dispatcher.nack(left)
        self._thread.join(1.0)

    def _release(self, messages: Sequence[Received]) -> list[str]:
        ids = [message.ack_id for message in messages]
        with self._room:
            for ack_id in ids:
                self._bytes -= self._held.pop(ack_id, 0)
            self._room.notify_all()
        return ids

    def _run(self) -> None:
        now = time.monotonic()
        next_extension, next_keepalive = now + self._period, now + KEEPALIVE_SECONDS
        while not self._closed.wait(max(0.0, min(next_extension, next_keepalive) - now)):
            now = time.monotonic()
            if now >= next_extension:
                with self._room:
                    held = list(self._held)
                if held:
                    self._dispatcher.extend(held)
                next_extension = now + self._period
            if now >= next_keepalive:
                self._keepalive()
                next_keepalive = now + KEEPALIVE_SECONDS
