"""Leases of the messages the batch-native consumer holds, and the requests that end them.

The rule it owns: a held message's lease is extended (modify ack deadline) for as long as it is
held, and never after it was acked or handed back. Acks, nacks and extensions leave from one
thread: each pass sends every ack queued since the last pass, then every nack, then (when due) one
extension of what is still held; split at Pub/Sub's request limits and retried as the client
library retries them (its GAPIC defaults); the writer never waits for them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import structlog
from google.api_core import exceptions as google_exceptions
from google.cloud import pubsub_v1
from google.pubsub_v1 import types as pubsub_types

from processor.errors import first_line
from processor.pipeline.messages import Received
from processor.runtime.logs import excerpt
from processor.runtime.metrics import Metrics

_log = structlog.get_logger("processor.pipeline.leases")

MAX_IDS_PER_REQUEST = 2500  # Pub/Sub: ack ids in one Acknowledge or ModifyAckDeadline request
MAX_REQUEST_BYTES = 512 * 1024  # Pub/Sub: bytes in one such request
KEEPALIVE_SECONDS = 30.0  # an empty request on every stream this often keeps idle streams open
RESUME_AT = 0.8  # a paused stream reads again once what is held falls below this share

_ACK = pubsub_types.AcknowledgeRequest
_MODACK = pubsub_types.ModifyAckDeadlineRequest
_Request = tuple[str, list[str]] | None  # ("ack" | "nack", ack ids); None stops the thread


class Leases:
    """What the consumer holds (ack id -> bytes), the flow-control gate on it, and the one
    thread that sends acks, nacks, lease extensions and stream keepalives."""

    def __init__(
        self,
        subscriber: pubsub_v1.SubscriberClient,
        subscription: str,
        lease_seconds: int,
        max_messages: int,
        max_bytes: int,
        metrics: Metrics,
        keepalive: Callable[[], None],
    ) -> None:
        self._subscriber = subscriber
        self._subscription = subscription
        self._lease_seconds = lease_seconds
        self._max_messages, self._max_bytes = max_messages, max_bytes
        self._metrics = metrics
        self._keepalive = keepalive
        self._held: dict[str, int] = {}
        self._bytes = 0
        self._room = threading.Condition()
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

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
        self._release("ack", messages)

    def nack(self, messages: Sequence[Received]) -> None:
        self._release("nack", messages)

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

    def __len__(self) -> int:
        with self._room:
            return len(self._held)

    def close(self, timeout: float) -> None:
        """Hand back whatever is still held, send every request queued, stop the thread."""
        with self._room:
            left = list(self._held)
            self._held.clear()
            self._bytes = 0
            self._room.notify_all()
        if left:
            self._requests.put(("nack", left))
        self._requests.put(None)
        self._thread.join(timeout)

    def _release(self, kind: str, messages: Sequence[Received]) -> None:
        ids = [message.ack_id for message in messages]
        with self._room:
            for ack_id in ids:
                self._bytes -= self._held.pop(ack_id, 0)
            self._room.notify_all()
        self._requests.put((kind, ids))

    def _run(self) -> None:
        period = self._lease_seconds / 3  # a lease is renewed when two thirds of it remain
        next_extension = next_keepalive = time.monotonic()
        next_extension += period
        next_keepalive += KEEPALIVE_SECONDS
        while True:
            wait = max(0.0, min(next_extension, next_keepalive) - time.monotonic())
            batch = _drain(self._requests, wait)
            requests = [item for item in batch if item is not None]
            acks = [i for kind, ids in requests if kind == "ack" for i in ids]
            nacks = [i for kind, ids in requests if kind == "nack" for i in ids]
            self._send("ack", acks)
            self._send("nack", nacks)
            now = time.monotonic()
            if now >= next_extension:
                with self._room:
                    held = list(self._held)
                self._send("extend", held)
                next_extension = now + period
            if now >= next_keepalive:
                self._keepalive()
                next_keepalive = now + KEEPALIVE_SECONDS
            if None in batch:  # close(): everything queued before it has been sent
                return

    def _send(self, kind: str, ack_ids: list[str]) -> None:
        for chunk in _chunks(ack_ids):
            try:
                # Requests are built as raw protobuf and wrapped: proto-plus would marshal the
                # list one id at a time, a fifth of a busy processor's CPU.
                if kind == "ack":
                    ack = _ACK.pb()(subscription=self._subscription, ack_ids=chunk)
                    self._subscriber.acknowledge(request=_ACK.wrap(ack))
                else:
                    seconds = 0 if kind == "nack" else self._lease_seconds
                    modack = _MODACK.pb()(
                        subscription=self._subscription,
                        ack_ids=chunk,
                        ack_deadline_seconds=seconds,
                    )
                    self._subscriber.modify_ack_deadline(request=_MODACK.wrap(modack))
            except (google_exceptions.GoogleAPIError, ValueError) as exc:
                # Best effort, as in the client library: an ack that is lost is redelivered, a
                # lost extension or nack only changes when the message comes back.
                self._metrics.lease_requests_failed.labels(request=kind).inc()
                _log.warning(
                    "lease_request_failed",
                    request=kind,
                    messages=len(chunk),
                    error=excerpt(first_line(exc)),
                )


def _drain(requests: queue.SimpleQueue[_Request], wait: float) -> list[_Request]:
    """Everything queued, waiting up to `wait` seconds for the first item."""
    try:
        batch = [requests.get(timeout=wait)] if wait > 0 else [requests.get_nowait()]
    except queue.Empty:
        return []
    while True:
        try:
            batch.append(requests.get_nowait())
        except queue.Empty:
            return batch


def _chunks(ack_ids: list[str]) -> Iterator[list[str]]:
    """Ack ids in requests within Pub/Sub's limits: at most 2,500 ids and 512 KiB each (with
    room for the subscription name, and 3 bytes of framing an id). Sized by the longest id, so
    ids of one length (Pub/Sub's are) take as few requests as the limits allow."""
    if not ack_ids:
        return
    longest = max(map(len, ack_ids)) + 3
    size = max(1, min(MAX_IDS_PER_REQUEST, (MAX_REQUEST_BYTES - 4096) // longest))
    for start in range(0, len(ack_ids), size):
        yield ack_ids[start : start + size]
