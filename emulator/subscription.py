"""Delivery state of one subscription: ready queue, leases, open streams, ordering keys.

Everything here runs under the subscription's own lock; nothing here knows about gRPC. Work that
touches other subscriptions (dead-lettering) is handed back to the broker and done after the lock
is released, so two subscriptions never wait on each other.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from emulator.clock import Clock
from emulator.errors import NotFound
from emulator.model import (
    MAX_RESPONSE_BYTES,
    PER_MESSAGE_OVERHEAD,
    UNLIMITED,
    DeliveryPolicy,
    Entry,
    StoredMessage,
    Stream,
    StreamRing,
)
from emulator.trace import DeliveryTrace

Delivery = tuple[str, Any, int]
DeadLetterSink = Callable[["SubscriptionState", list[Entry]], None]


class SubscriptionState:
    """The delivery state machine of one subscription."""

    _ack_prefixes = itertools.count(1)

    def __init__(
        self, name: str, policy: DeliveryPolicy, clock: Clock, dead_letter: DeadLetterSink
    ) -> None:
        self.name = name
        self.policy = policy
        self._clock = clock
        self._dead_letter = dead_letter
        self._lock = threading.Lock()
        self._pull_cond = threading.Condition(self._lock)
        self._ready: deque[Entry] = deque()
        self._leases: dict[str, Entry] = {}
        self._streams = StreamRing()
        self._held: defaultdict[str, deque[Entry]] = defaultdict(deque)
        self._busy_keys: set[str] = set()
        self._ack_prefix = f"{next(self._ack_prefixes)}-"
        self._ack_seq = itertools.count(1)
        self._deleted = False
        self.trace: DeliveryTrace | None = None  # see start_trace()

    # -- publishing side -------------------------------------------------------------------

    def enqueue(self, msgs: Iterable[StoredMessage]) -> None:
        with self._lock:
            for msg in msgs:
                self._admit(Entry(msg))
            self._wake()

    def _admit(self, e: Entry) -> None:
        key = e.msg.ordering_key
        if key and self.policy.ordered:
            if key in self._busy_keys:
                self._held[key].append(e)
                return
            self._busy_keys.add(key)
        self._ready.append(e)

    def _release_key(self, e: Entry) -> None:
        """The entry is done for good: let the next message of its ordering key go."""
        key = e.msg.ordering_key
        if not (key and self.policy.ordered):
            return
        held = self._held.get(key)
        if held:
            self._ready.append(held.popleft())
            if not held:
                del self._held[key]
        else:
            self._busy_keys.discard(key)

    def _wake(self) -> None:
        if not self._ready:
            return
        for s in self._streams.in_turn(len(self._ready)):
            s.cond.notify()
        self._pull_cond.notify_all()

    # -- streams ---------------------------------------------------------------------------

    def open_stream(
        self, client_id: str, max_messages: int, max_bytes: int, deadline: int
    ) -> Stream:
        with self._lock:
            if self._deleted:
                raise NotFound(f"Subscription does not exist (resource={self.name})")
            stream = Stream(self._lock, client_id, max_messages, max_bytes, deadline)
            self._streams.add(stream)
            return stream

    def close_stream(self, stream: Stream, code: str = "UNAVAILABLE", reason: str = "") -> None:
        """Forget the stream at once; its leases run out on their own and then redeliver."""
        with self._lock:
            self._close_locked(stream, code, reason)

    def _close_locked(self, stream: Stream, code: str, reason: str) -> None:
        if stream.closed:
            return
        stream.closed, stream.close_code, stream.close_reason = True, code, reason
        self._streams.remove(stream)
        if self.trace is not None:
            for ack_id, e in self._leases.items():
                if e.stream is stream:
                    self._note(e, f"stream {stream.number} closed ({code}) with {ack_id} leased")
        stream.cond.notify_all()
        self._wake()  # a message that was this stream's turn goes to the next one

    def close_all_streams(self, code: str, reason: str) -> None:
        with self._lock:
            for stream in list(self._streams):
                self._close_locked(stream, code, reason)

    def stream_count(self) -> int:
        with self._lock:
            return len(self._streams)

    def set_stream_deadline(self, stream: Stream, seconds: int) -> None:
        with self._lock:
            stream.ack_deadline = seconds

    # -- delivery --------------------------------------------------------------------------

    def take(self, stream: Stream | None, max_messages: int, wait: float) -> list[Delivery] | None:
        """Lease up to `max_messages` ready messages, waiting up to `wait` s for the first.

        Returns None when the stream was closed, [] when the wait ran out. Each delivery is
        (ack_id, PubsubMessage, delivery attempt), captured under the lock.
        """
        cond = stream.cond if stream is not None else self._pull_cond
        end = time.monotonic() + wait
        with self._lock:
            while True:
                if self._deleted and stream is None:
                    raise NotFound(f"Subscription does not exist (resource={self.name})")
                if stream is not None and stream.closed:
                    return None
                if self._ready and (
                    stream is None or self._streams.may_take(stream, len(self._ready))
                ):
                    break
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return []
                cond.wait(remaining)
            n, nbytes = stream.quota() if stream is not None else (max_messages, UNLIMITED)
            # Spread a backlog over every open stream rather than letting the first one drain it.
            takers = sum(1 for s in self._streams if s.wants_more())
            share = math.ceil(len(self._ready) / max(1, takers))
            batch = self._lease(stream, min(n, share, max_messages), nbytes)
            if stream is not None:
                self._streams.served(stream)
            if self._ready:
                self._wake()
            return batch

    def _lease(self, stream: Stream | None, n: int, nbytes: int) -> list[Delivery]:
        now = time.monotonic()
        wall_cutoff = time.time() - self.policy.retention
        deadline = now + (stream.ack_deadline if stream is not None else self.policy.ack_deadline)
        budget = min(nbytes, MAX_RESPONSE_BYTES)
        batch: list[Delivery] = []
        nbytes_taken = 0
        ready, leases, prefix, seq = self._ready, self._leases, self._ack_prefix, self._ack_seq
        while ready and len(batch) < n:
            e = ready[0]
            size = e.msg.size + PER_MESSAGE_OVERHEAD
            if batch and size > budget:
                break
            ready.popleft()
            if e.msg.publish_wall < wall_cutoff:
                self._release_key(e)
                continue
            budget -= size
            nbytes_taken += e.msg.size
            e.attempts += 1
            e.ack_id = ack_id = f"{prefix}{next(seq)}"
            e.stream, e.deadline, e.check_at = stream, deadline, deadline
            leases[ack_id] = e
            batch.append((ack_id, e.msg.pb, e.attempts))
            if self.trace is not None:
                where = f"stream {stream.number}" if stream is not None else "pull"
                event = f"delivered {ack_id} attempt {e.attempts} on {where}"
                self.trace.delivered(e.msg.pb.message_id, ack_id, event)
        if stream is not None:
            stream.outstanding += len(batch)
            stream.outstanding_bytes += nbytes_taken
        if batch:
            self._clock.call_at(deadline, partial(self._check_leases, [d[0] for d in batch]))
        return batch

    # -- lease ends ------------------------------------------------------------------------

    def acknowledge(self, ack_ids: Iterable[str]) -> None:
        with self._lock:
            pop = self._leases.pop
            for ack_id in ack_ids:
                e = pop(ack_id, None)
                if e is not None:
                    if self.trace is not None:
                        self._note(e, f"acked {ack_id}")
                    self._end_lease(e)
                    self._release_key(e)
                elif self.trace is not None:
                    self.trace.ignored(ack_id, "ack")
            self._wake()

    def modify_deadline(self, ack_ids: Iterable[str], seconds: int) -> None:
        """Extend (or with 0, nack) the leases of the given ack ids; unknown ids are ignored."""
        if seconds == 0:
            self._nack(ack_ids)
            return
        now = time.monotonic()
        deadline = now + seconds
        earlier: list[str] = []
        with self._lock:
            get = self._leases.get
            for ack_id in ack_ids:
                e = get(ack_id)
                if e is None:
                    if self.trace is not None:
                        self.trace.ignored(ack_id, f"extension by {seconds}s")
                    continue
                if self.trace is not None:
                    self._note(e, f"extended {ack_id} by {seconds}s")
                e.deadline = deadline
                if deadline < e.check_at:
                    e.check_at = deadline
                    earlier.append(ack_id)
        if earlier:
            self._clock.call_at(deadline, partial(self._check_leases, earlier))

    def _nack(self, ack_ids: Iterable[str]) -> None:
        dead: list[Entry] = []
        with self._lock:
            pop = self._leases.pop
            for ack_id in ack_ids:
                e = pop(ack_id, None)
                if e is not None:
                    if self.trace is not None:
                        self._note(e, f"nacked {ack_id}")
                    self._end_lease(e)
                    self._redeliver(e, dead)
                elif self.trace is not None:
                    self.trace.ignored(ack_id, "nack")
            self._wake()
        if dead:
            self._dead_letter(self, dead)

    def _check_leases(self, ack_ids: list[str]) -> None:
        """Clock callback: expire leases that ran out; re-arm the ones that were extended."""
        now = time.monotonic()
        dead: list[Entry] = []
        later: defaultdict[float, list[str]] = defaultdict(list)
        with self._lock:
            for ack_id in ack_ids:
                e = self._leases.get(ack_id)
                if e is None:
                    continue
                if e.deadline <= now:
                    del self._leases[ack_id]
                    if self.trace is not None:
                        self._note(e, f"lease of {ack_id} ran out")
                    self._end_lease(e)
                    self._redeliver(e, dead)
                elif e.check_at <= now:  # this was its pending check; later ones cover the rest
                    e.check_at = e.deadline
                    later[e.deadline].append(ack_id)
            self._wake()
        for when, ids in later.items():
            self._clock.call_at(when, partial(self._check_leases, ids))
        if dead:
            self._dead_letter(self, dead)

    def _end_lease(self, e: Entry) -> None:
        stream = e.stream
        if stream is not None:
            stream.outstanding -= 1
            stream.outstanding_bytes -= e.msg.size
        e.ack_id, e.stream = None, None

    def _redeliver(self, e: Entry, dead: list[Entry]) -> None:
        """Put an unacked message back, after its backoff, or collect it for dead-lettering
        (keeping its ordering key busy until the forward is done)."""
        if self.policy.max_attempts and e.attempts >= self.policy.max_attempts:
            if self.trace is not None:
                self._note(e, "to the dead-letter topic")
            dead.append(e)
            return
        self._retry(e)

    def _retry(self, e: Entry) -> None:
        delay = self.policy.backoff(e.attempts)
        if self.trace is not None:
            self._note(e, f"redelivery after {delay:.1f}s of backoff")
        if delay <= 0:
            self._ready.appendleft(e)
        else:
            self._clock.call_at(time.monotonic() + delay, partial(self._back_from_backoff, e))

    def _back_from_backoff(self, e: Entry) -> None:
        with self._lock:
            if not self._deleted:
                self._ready.append(e)
                self._wake()

    def forwarded(self, entries: list[Entry]) -> None:
        """The broker published these to the dead-letter topic: they are done here."""
        with self._lock:
            for e in entries:
                self._release_key(e)
            self._wake()

    def requeue(self, entries: list[Entry]) -> None:
        """Their dead-letter forward failed: deliver them again, as Pub/Sub would."""
        with self._lock:
            if self._deleted:
                return
            for e in entries:
                self._retry(e)
            self._wake()

    # -- housekeeping ----------------------------------------------------------------------

    def purge_expired(self) -> None:
        """Drop ready messages older than the retention duration."""
        cutoff = time.time() - self.policy.retention
        with self._lock:
            if any(e.msg.publish_wall < cutoff for e in self._ready):
                keep = deque()
                for e in self._ready:
                    if e.msg.publish_wall < cutoff:
                        self._release_key(e)
                    else:
                        keep.append(e)
                self._ready = keep

    def delete(self) -> None:
        with self._lock:
            self._deleted = True
            for stream in list(self._streams):
                self._close_locked(stream, "NOT_FOUND", "Subscription does not exist")
            self._ready.clear()
            self._leases.clear()
            self._pull_cond.notify_all()

    def start_trace(self) -> DeliveryTrace:
        """Keep every message's history from now on (deliveries, extensions, acks, nacks,
        expiries, stream ends), for tests to explain a failure with; off by default."""
        with self._lock:
            if self.trace is None:
                self.trace = DeliveryTrace()
            return self.trace

    def _note(self, e: Entry, event: str) -> None:
        assert self.trace is not None
        self.trace.record(e.msg.pb.message_id, event)

    def whereabouts(self, message_ids: Iterable[str]) -> dict[str, tuple[str, list[str]]]:
        """Where each message is now (ready, held behind its ordering key, leased: as which ack
        id, on which stream, for how long; or "nowhere" once acked, dead-lettered or while in
        backoff) with its history when traced, both read at one instant. For test diagnostics."""
        wanted = set(message_ids)
        now = time.monotonic()
        found: dict[str, str] = {}
        with self._lock:
            for position, e in enumerate(self._ready):
                if e.msg.pb.message_id in wanted:
                    found[e.msg.pb.message_id] = f"ready (position {position})"
            for key, held in self._held.items():
                for e in held:
                    if e.msg.pb.message_id in wanted:
                        found[e.msg.pb.message_id] = f"held behind ordering key {key!r}"
            for ack_id, e in self._leases.items():
                if e.msg.pb.message_id in wanted:
                    stream = e.stream
                    on = "pull" if stream is None else f"stream {stream.number}"
                    if stream is not None and stream.closed:
                        on += " (closed)"
                    found[e.msg.pb.message_id] = (
                        f"leased as {ack_id} on {on}, {e.deadline - now:.1f}s left"
                    )
            history = self.trace.history if self.trace is not None else lambda _m: []
            return {
                m: (found.get(m, "nowhere: acked, in backoff or dead-lettered"), history(m))
                for m in wanted
            }

    def describe(self) -> str:
        """One line: ready and leased counts, leases by stream, the open streams' windows."""
        with self._lock:
            by_stream: defaultdict[str, int] = defaultdict(int)
            for e in self._leases.values():
                s = e.stream
                name = "pull" if s is None else f"{s.number}{' (closed)' if s.closed else ''}"
                by_stream[name] += 1
            streams = ", ".join(
                f"{s.number}: {s.outstanding}/{s.max_messages} outstanding" for s in self._streams
            )
            return (
                f"ready {len(self._ready)}, leased {len(self._leases)} "
                f"(by stream: {dict(by_stream)}), open streams [{streams}]"
            )

    def delivered_before(self) -> int:
        """Ready messages that were delivered before (handed back, or their lease ran out)."""
        with self._lock:
            return sum(1 for e in self._ready if e.attempts)

    def backlog(self) -> tuple[int, int]:
        """(ready, leased) message counts, for tests and logs."""
        with self._lock:
            return len(self._ready), len(self._leases)
