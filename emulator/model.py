"""The values the broker moves around: stored messages, their per-subscription entries, streams."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass

UNLIMITED = 1 << 62
# Responses stay under the client's default 4 MiB receive limit with room for framing.
MAX_RESPONSE_BYTES = 3_500_000
PER_MESSAGE_OVERHEAD = 64
_stream_numbers = itertools.count(1)


@dataclass(slots=True, frozen=True)
class StoredMessage:
    """One published message, shared read-only by every subscription of its topic."""

    pb: object  # _pb.PubsubMessage with message_id and publish_time set
    size: int
    publish_wall: float
    ordering_key: str


class Entry:
    """A message's life in one subscription; a delivery gives it a fresh ack id."""

    __slots__ = ("ack_id", "attempts", "check_at", "deadline", "msg", "stream")

    def __init__(self, msg: StoredMessage) -> None:
        self.msg = msg
        self.attempts = 0
        self.ack_id: str | None = None
        self.stream: Stream | None = None
        self.deadline = 0.0
        self.check_at = 0.0


class Stream:
    """One open StreamingPull as the broker sees it, with its own flow-control window."""

    def __init__(
        self,
        lock: threading.Lock,
        client_id: str,
        max_messages: int,
        max_bytes: int,
        ack_deadline: int,
    ) -> None:
        self.cond = threading.Condition(lock)
        self.number = next(_stream_numbers)  # names the stream in traces and logs
        self.client_id = client_id
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.ack_deadline = ack_deadline
        self.outstanding = 0
        self.outstanding_bytes = 0
        self.closed = False
        self.close_code = "UNAVAILABLE"
        self.close_reason = ""

    def quota(self) -> tuple[int, int]:
        """How many more messages and bytes this stream may have outstanding."""
        n = self.max_messages - self.outstanding if self.max_messages > 0 else UNLIMITED
        b = self.max_bytes - self.outstanding_bytes if self.max_bytes > 0 else UNLIMITED
        return n, b

    def wants_more(self) -> bool:
        """Whether enough of the window is free to be worth a response.

        Like the client's own pause/resume hysteresis (pause at 100 %, resume below 80 %): refilling
        a nearly full window one ack batch at a time makes the client handle many small responses.
        """
        n, b = self.quota()
        return n >= max(1, self.max_messages // 5) and b >= max(1, self.max_bytes // 5)


class StreamRing:
    """The open streams of one subscription, and whose turn it is.

    While fewer messages are ready than there are streams, one stream with room per ready message
    may take, in turn after the last one served, so that a trickle goes round every open stream
    (Pub/Sub spreads over streams too, though it promises no order); with a backlog, every
    stream with room may take its share at once.
    """

    def __init__(self) -> None:
        self.streams: list[Stream] = []
        self._turn = 0  # index of the stream whose turn is next

    def __len__(self) -> int:
        return len(self.streams)

    def __iter__(self) -> Iterator[Stream]:
        return iter(self.streams)

    def add(self, stream: Stream) -> None:
        self.streams.append(stream)

    def remove(self, stream: Stream) -> None:
        index = self.streams.index(stream)
        del self.streams[index]
        if index < self._turn:
            self._turn -= 1

    def served(self, stream: Stream) -> None:
        self._turn = self.streams.index(stream) + 1

    def in_turn(self, ready: int) -> list[Stream]:
        """The streams that may take now, with `ready` messages waiting."""
        streams = self.streams
        if ready >= len(streams):
            return [s for s in streams if s.wants_more()]
        start = self._turn % len(streams)
        chosen: list[Stream] = []
        for s in streams[start:] + streams[:start]:
            if s.wants_more():
                chosen.append(s)
                if len(chosen) == ready:
                    break
        return chosen

    def may_take(self, stream: Stream, ready: int) -> bool:
        if ready >= len(self.streams):  # the fast path of a backlog
            return stream.wants_more()
        return stream in self.in_turn(ready)


@dataclass(slots=True)
class DeliveryPolicy:
    """The parts of a subscription's settings that shape delivery."""

    ack_deadline: int = 10
    retention: float = 7 * 86400.0
    ordered: bool = False
    max_attempts: int = 0  # 0: no dead-letter policy
    min_backoff: float | None = None  # None: no retry policy, redeliver at once
    max_backoff: float = 600.0

    def backoff(self, attempts: int) -> float:
        if self.min_backoff is None:
            return 0.0
        return min(self.max_backoff, self.min_backoff * 2 ** max(0, attempts - 1))
