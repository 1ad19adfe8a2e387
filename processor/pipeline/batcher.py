"""Collects decoded messages until a batch is full or old enough to flush."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence

from processor.pipeline.messages import Held


class Batcher:
    """Thread-safe hand-off from the consumer to the single writer thread.

    A batch is ready when it holds `size` messages or its oldest message has waited
    `max_wait` seconds. After `close()` nothing more is taken in; what is held can still be
    taken, so it can be committed or handed back.
    """

    def __init__(self, size: int, max_wait: float) -> None:
        self._size = size
        self._max_wait = max_wait
        self._items: list[Held] = []
        self._oldest_at = 0.0
        self._arrivals: deque[list[float]] = deque()  # [monotonic time, messages] per hand-off
        self._closed = False
        self._ready = threading.Condition()

    def add_many(self, held: Sequence[Held]) -> bool:
        """Take messages in; False once closed (the caller must hand them back)."""
        with self._ready:
            if self._closed:
                return False
            now = time.monotonic()
            if not self._items:
                # The writer sleeps while there is nothing to write: wake it, so the first
                # message after an idle spell waits max_wait, not the writer's idle period.
                self._oldest_at = now
                self._ready.notify()
            self._items += held
            self._arrivals.append([now, len(held)])
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
                    return self._pop(self._size)
                if self._closed or (deadline is not None and now >= deadline):
                    return []
                # Idle, it sleeps until woken: by the first message, by close(), or the deadline.
                wait = self._oldest_at + self._max_wait - now if self._items else None
                if deadline is not None:
                    wait = deadline - now if wait is None else min(wait, deadline - now)
                self._ready.wait(wait)

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def drain(self) -> list[Held]:
        """Everything held, at once (to hand it back)."""
        with self._ready:
            return self._pop(len(self._items))

    def oldest_age(self) -> float:
        """Seconds the oldest message waiting for the writer has been held (0 when none)."""
        with self._ready:
            return time.monotonic() - self._arrivals[0][0] if self._arrivals else 0.0

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        with self._ready:
            return len(self._items)

    def _pop(self, count: int) -> list[Held]:
        batch, self._items = self._items[:count], self._items[count:]
        self._oldest_at = time.monotonic()  # what remains counts as new: it waits at most one more
        taken = len(batch)
        while taken and self._arrivals:
            first = self._arrivals[0]
            if first[1] > taken:
                first[1] -= taken
                break
            taken -= int(first[1])
            self._arrivals.popleft()
        return batch
