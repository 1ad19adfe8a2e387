"""Fault injection: make the next N calls of an RPC fail or stall, optionally for one topic only."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import grpc


@dataclass
class Fault:
    """What to do to one call: wait `delay` seconds, then fail with `code` unless it is None."""

    method: str
    remaining: int
    code: grpc.StatusCode | None
    delay: float
    topic: str | None


class Faults:
    """Thread-safe queue of pending faults; the gRPC layer consults it before each call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Fault] = []

    def fail_next(
        self,
        method: str,
        n: int = 1,
        code: grpc.StatusCode | None = grpc.StatusCode.UNAVAILABLE,
        delay: float = 0.0,
        topic: str | None = None,
    ) -> None:
        """The next `n` calls of RPC `method` (e.g. "Publish") fail with `code` after `delay` s.

        With `code=None` they only stall. With `topic`, only calls for that topic count.
        """
        if n < 1:
            raise ValueError("n must be at least 1")
        with self._lock:
            self._pending.append(Fault(method, n, code, delay, topic))

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()

    def take(self, method: str, topic: str | None = None) -> Fault | None:
        """Consume one call's worth of the first matching fault, if any."""
        with self._lock:
            for fault in self._pending:
                if fault.method == method and fault.topic in (None, topic):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._pending.remove(fault)
                    return fault
        return None
