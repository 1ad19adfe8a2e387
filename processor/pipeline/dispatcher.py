"""Sending what the leases decided: acks, nacks and lease extensions, as unary requests.

The rule it owns: an extension never waits behind an ack. Acks and nacks leave from one thread
in the order they were decided; extensions leave from a thread of their own, the newest set
replacing one not yet sent. Every request is split at Pub/Sub's limits and has a deadline
shorter than a lease (a third of it, retries included), so a slow or silent endpoint costs
the messages whose ack was lost a redelivery, never the leases of the messages still held.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import structlog
from google.api_core import exceptions as google_exceptions
from google.api_core import retry as retries
from google.cloud import pubsub_v1
from google.pubsub_v1 import types as pubsub_types

from processor.errors import first_line
from processor.runtime.logs import excerpt, supervised_thread
from processor.runtime.metrics import Metrics
from processor.runtime.pubsub import ack_id_chunks

_log = structlog.get_logger("processor.pipeline.dispatcher")

_ACK = pubsub_types.AcknowledgeRequest
_MODACK = pubsub_types.ModifyAckDeadlineRequest
_UNANSWERED = (google_exceptions.DeadlineExceeded, google_exceptions.RetryError)
_Settle = tuple[str, list[str]] | None  # ("ack" | "nack", ack ids); None stops the thread


class Dispatcher:
    """Two named threads: `settler` sends acks and nacks, `extender` sends lease extensions.
    `on_timeout` hears of every request left unanswered past its deadline (a sign of a dead
    connection, which the streams' watch acts on)."""

    def __init__(
        self,
        subscriber: pubsub_v1.SubscriberClient,
        subscription: str,
        lease_seconds: int,
        metrics: Metrics,
        on_timeout: Callable[[], None] = lambda: None,
        on_answer: Callable[[], None] = lambda: None,
    ) -> None:
        self._subscriber = subscriber
        self._subscription = subscription
        self._lease_seconds = lease_seconds
        self._metrics = metrics
        self._on_timeout, self._on_answer = on_timeout, on_answer
        # A third of a lease: an extension sent when two thirds of the lease remain has an
        # answer, or has given up, before the next one is due.
        self.deadline = max(2.0, lease_seconds / 3)
        self.retry = retries.Retry(
            predicate=retries.if_exception_type(google_exceptions.ServiceUnavailable),
            initial=0.1,
            maximum=1.0,
            multiplier=1.3,
            timeout=self.deadline,
        )
        self._settles: queue.SimpleQueue[_Settle] = queue.SimpleQueue()
        self._extension: list[str] | None = None
        self._extension_due = threading.Condition()
        self._closing = False
        self._settler = supervised_thread(self._settle, "ack-sender")
        self._extender = supervised_thread(self._extend, "lease-extender")

    def start(self) -> None:
        self._settler.start()
        self._extender.start()

    def alive(self) -> bool:
        """Both threads run (or were closed on purpose)."""
        return self._closing or (self._settler.is_alive() and self._extender.is_alive())

    def ack(self, ack_ids: list[str]) -> None:
        self._settles.put(("ack", ack_ids))

    def nack(self, ack_ids: list[str]) -> None:
        self._settles.put(("nack", ack_ids))

    def extend(self, ack_ids: list[str]) -> None:
        """Extend these leases; never blocks. An extension not yet sent is replaced."""
        with self._extension_due:
            self._extension = ack_ids
            self._extension_due.notify()

    def close(self, timeout: float) -> None:
        """Send every ack and nack queued, then stop both threads (within `timeout`)."""
        with self._extension_due:
            self._closing = True
            self._extension = None
            self._extension_due.notify()
        self._settles.put(None)
        self._settler.join(timeout)
        self._extender.join(0.1)

    def _settle(self) -> None:
        while True:
            batch = _drain(self._settles)
            requests = [item for item in batch if item is not None]
            self.send("ack", [i for kind, ids in requests if kind == "ack" for i in ids])
            self.send("nack", [i for kind, ids in requests if kind == "nack" for i in ids])
            if None in batch:  # close(): everything queued before it has been sent
                return

    def _extend(self) -> None:
        while True:
            with self._extension_due:
                self._extension_due.wait_for(lambda: self._closing or self._extension is not None)
                if self._closing:
                    return
                ack_ids, self._extension = self._extension or [], None
            self.send("extend", ack_ids)

    def send(self, kind: str, ack_ids: list[str]) -> None:
        """Send one kind of request for these ids, in requests within Pub/Sub's limits."""
        for chunk in ack_id_chunks(ack_ids):
            try:
                self._call(kind, chunk)
                self._on_answer()
            except (google_exceptions.GoogleAPIError, ValueError) as exc:
                # Best effort, as in the client library: an ack that is lost is redelivered, a
                # lost extension or nack only changes when the message comes back.
                self._metrics.lease_requests_failed.labels(request=kind).inc()
                if isinstance(exc, _UNANSWERED):
                    self._on_timeout()
                _log.warning(
                    "lease_request_failed",
                    request=kind,
                    messages=len(chunk),
                    error=excerpt(first_line(exc)),
                )

    def _call(self, kind: str, chunk: list[str]) -> None:
        # Requests are built as raw protobuf and wrapped: proto-plus would marshal the list
        # one id at a time, a fifth of a busy processor's CPU.
        if kind == "ack":
            ack = _ACK.pb()(subscription=self._subscription, ack_ids=chunk)
            self._subscriber.acknowledge(
                request=_ACK.wrap(ack), retry=self.retry, timeout=self.deadline
            )
            return
        seconds = 0 if kind == "nack" else self._lease_seconds
        modack = _MODACK.pb()(
            subscription=self._subscription, ack_ids=chunk, ack_deadline_seconds=seconds
        )
        self._subscriber.modify_ack_deadline(
            request=_MODACK.wrap(modack), retry=self.retry, timeout=self.deadline
        )


def _drain(requests: queue.SimpleQueue[_Settle]) -> list[_Settle]:
    """Everything queued, waiting for the first item."""
    batch = [requests.get()]
    while True:
        try:
            batch.append(requests.get_nowait())
        except queue.Empty:
            return batch
