"""One timer thread for the whole broker: lease expiry, retry backoff and retention sweeps.

A heap of due times replaces per-message timers, so a million leases cost one thread.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable

import structlog

_log = structlog.get_logger(__name__)


class Clock:
    """Runs callables at monotonic due times on one named thread; `start()`/`stop()` bracket it."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="emulator-clock", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        """Run `fn` on the clock thread once `time.monotonic()` reaches `when`."""
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), fn))
            if self._heap[0][2] is fn:
                self._cond.notify()

    def call_every(self, interval: float, fn: Callable[[], None]) -> None:
        def repeat() -> None:
            fn()
            self.call_at(time.monotonic() + interval, repeat)

        self.call_at(time.monotonic() + interval, repeat)

    def _next_due(self) -> list[Callable[[], None]]:
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                if self._heap and self._heap[0][0] <= now:
                    due = []
                    while self._heap and self._heap[0][0] <= now:
                        due.append(heapq.heappop(self._heap)[2])
                    return due
                self._cond.wait(self._heap[0][0] - now if self._heap else None)
            return []

    def _run(self) -> None:
        while due := self._next_due():
            for fn in due:
                try:
                    fn()
                except Exception:
                    _log.exception("clock_task_failed")
