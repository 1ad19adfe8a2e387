"""What happened to each message of a subscription, kept only when a test asks for it
(`SubscriptionState.start_trace()`).

A failed convergence test needs to tell a lost message (acked, yet never stored) from a late one
(still leased, in backoff, or ready): the trace keeps every delivery, extension, ack, nack,
expiry and stream end per message id, with times relative to the trace's start.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict

# Events kept per message (every attempt of a message that dead-letters at 100), and in all: a
# long test's subscription stops recording rather than growing without bound.
MAX_EVENTS_PER_MESSAGE = 400
MAX_EVENTS = 200_000


class DeliveryTrace:
    """Per-message event lists; the subscription calls `record` under its own lock."""

    def __init__(self) -> None:
        self._start = time.monotonic()
        self._lock = threading.Lock()
        self._events: defaultdict[str, list[str]] = defaultdict(list)
        self._messages: dict[str, str] = {}  # ack id -> message id, for requests on dead leases
        self._count = 0
        self.last_ack: float | None = None  # seconds into the trace of the latest ack
        # Deliveries per message id, counted whole even once the event lists stop growing.
        self.deliveries: Counter[str] = Counter()

    def delivered(self, message_id: str, ack_id: str, event: str) -> None:
        with self._lock:
            self._messages[ack_id] = message_id
            self.deliveries[message_id] += 1
        self.record(message_id, event)

    def ignored(self, ack_id: str, request: str) -> None:
        """A request named an ack id whose lease had already ended: Pub/Sub ignores it."""
        with self._lock:
            message_id = self._messages.get(ack_id)
        if message_id is not None:
            self.record(message_id, f"{request} of {ack_id} ignored: its lease had ended")

    def record(self, message_id: str, event: str) -> None:
        """Append `event` (e.g. "delivered 1-7 on stream 3") to the message's history."""
        at = time.monotonic() - self._start
        line = f"{at:.2f}s {event}"
        with self._lock:
            if event.startswith("acked"):
                self.last_ack = at
            events = self._events[message_id]
            if len(events) < MAX_EVENTS_PER_MESSAGE and self._count < MAX_EVENTS:
                events.append(line)
                self._count += 1

    def history(self, message_id: str) -> list[str]:
        with self._lock:
            return list(self._events.get(message_id, ()))

    def now(self) -> str:
        """The trace's clock, to put the test's own events on the same time line."""
        return f"{time.monotonic() - self._start:.2f}s"

    @property
    def full(self) -> bool:
        return self._count >= MAX_EVENTS
