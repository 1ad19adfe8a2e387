"""The database watchdog: a call left unanswered past DATABASE_TIMEOUT (+1 s) is reported at once
and ended, so an outage the database's own timeouts miss (a silent network, a frozen server)
is retried like any other instead of hanging the writer."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# The database's own timeouts (statement, connect, TCP) are DATABASE_TIMEOUT; the watchdog steps
# in this much later, so that the database's error, when it comes, comes first.
GRACE_SECONDS = 1.0
WATCH_INTERVAL_SECONDS = 0.25


class Watchdog:
    """Runs database calls under a deadline; its thread ends the overdue one with `interrupt`
    and tells `on_overdue`, again every `answer_within` seconds while the call lasts (a
    reconnection within the call gets its own time)."""

    def __init__(
        self,
        interrupt: Callable[[], None],
        on_overdue: Callable[[float], None],
        database_timeout: float,
    ) -> None:
        self._interrupt = interrupt
        self._on_overdue = on_overdue
        self.answer_within = database_timeout + GRACE_SECONDS
        self._lock = threading.Lock()
        self._deadline: float | None = None  # when the call under way is overdue
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="database-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def alive(self) -> bool:
        """False once the watchdog's thread has died (stopped on purpose counts as alive)."""
        return self._thread.is_alive() or self._stop.is_set()

    def watched(self, call: Callable[..., T], *args: Any) -> T:
        """`call(*args)`, ended from the watchdog's thread if it is left unanswered."""
        with self._lock:
            self._deadline = time.monotonic() + self.answer_within
        try:
            return call(*args)
        finally:
            with self._lock:
                self._deadline = None

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_SECONDS):
            with self._lock:  # held while interrupting: the next call is not cut by mistake
                now = time.monotonic()
                if self._deadline is None or now < self._deadline:
                    continue
                self._deadline = now + self.answer_within
                self._interrupt()
            self._on_overdue(self.answer_within)
