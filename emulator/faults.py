"""Fault injection: make the next N calls of an RPC fail or stall, optionally for one topic only;
hold every call of an RPC for a while (a slow endpoint); or silence the open streams."""

from __future__ import annotations

import threading
import time
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


@dataclass
class _Hold:
    method: str
    delay: float
    until: float  # monotonic


class Faults:
    """Thread-safe queue of pending faults; the gRPC layer consults it before each call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Fault] = []
        self._holds: list[_Hold] = []
        self._silenced = 0  # streams opened before the n-th silence_streams() are silent

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

    def hold(self, method: str, delay: float, for_seconds: float) -> None:
        """Every call of unary RPC `method` arriving in the next `for_seconds` is held `delay`
        seconds, then served as usual: a slow endpoint (the service applies the request even if
        the client gave up waiting, as Pub/Sub may)."""
        if delay <= 0 or for_seconds <= 0:
            raise ValueError("delay and for_seconds must be positive")
        with self._lock:
            self._holds.append(_Hold(method, delay, time.monotonic() + for_seconds))

    def silence_streams(self) -> None:
        """The StreamingPulls open now go silent and stay open: they send no more responses,
        take no more messages and ignore what the client sends, until the client ends them
        (no status, no FIN). Streams opened later are served as usual. As a stream behind a
        frontend whose backend vanished: only the client can notice, by what it does not get."""
        with self._lock:
            self._silenced += 1

    def stream_epoch(self) -> int:
        """For a stream being opened: the value `silenced` compares against."""
        with self._lock:
            return self._silenced

    def silenced(self, epoch: int) -> bool:
        """Whether a stream opened at `epoch` has been silenced since."""
        return epoch < self._silenced

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()
            self._holds.clear()

    def take(self, method: str, topic: str | None = None) -> Fault | None:
        """Consume one call's worth of the first matching fault, if any."""
        with self._lock:
            for fault in self._pending:
                if fault.method == method and fault.topic in (None, topic):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._pending.remove(fault)
                    return fault
            now = time.monotonic()
            self._holds = [hold for hold in self._holds if hold.until > now]
            for hold in self._holds:
                if hold.method == method:
                    return Fault(method, 1, None, hold.delay, None)
        return None
