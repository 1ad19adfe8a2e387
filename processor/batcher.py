"""Collects decoded messages until a batch is full or old enough to flush."""

from __future__ import annotations

import threading
import time
from typing import Any, NamedTuple

from processor.schema import Observation


class Held(NamedTuple):
    """A message whose row is not committed yet: it must not be acked before it is."""

    message: Any  # google.cloud.pubsub_v1.subscriber.message.Message
    observation: Observation


class Batcher:
    """Thread-safe hand-off from the Pub/Sub callbacks to the single writer thread.

    A batch is ready when it holds `size` messages or its oldest message has waited
    `max_wait` seconds. After `close()` nothing more is taken in; what is held can still be
    taken, so it can be committed or handed back.
    """

    def __init__(self, size: int, max_wait: float) -> None:
        self._size = size
        self._max_wait = max_wait
        self._items: list[Held] = []
        self._oldest_at = 0.0
        self._closed = False
        self._ready = threading.Condition()

    def add(self, held: Held) -> bool:
        """Take a message in; False once closed (the caller must hand it back)."""
        with self._ready:
            if self._closed:
                return False
            if not self._items:
                self._oldest_at = time.monotonic()
            self._items.append(held)
            if len(self._items) >= self._size:
                self._ready.notify()
        return True

    def take(self, timeout: float | None = None) -> list[Held]:
        """The next batch; empty if none was ready within `timeout` or the batcher is closed
        and drained."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._ready:
            while True:
                now = time.monotonic()
                if self._items and (
                    self._closed
                    or len(self._items) >= self._size
                    or now - self._oldest_at >= self._max_wait
                ):
                    return self._pop()
                if self._closed or (deadline is not None and now >= deadline):
                    return []
                wait = self._oldest_at + self._max_wait - now if self._items else 0.5
                if deadline is not None:
                    wait = min(wait, deadline - now)
                self._ready.wait(wait)

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def drain(self) -> list[Held]:
        """Everything held, at once (to hand it back on shutdown)."""
        with self._ready:
            items, self._items = self._items, []
            return items

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        with self._ready:
            return len(self._items)

    def _pop(self) -> list[Held]:
        batch, self._items = self._items[: self._size], self._items[self._size :]
        self._oldest_at = time.monotonic()  # what remains counts as new: it waits at most one more
        return batch
