"""Batched, pipelined publishing through the real google-cloud-pubsub client.

Why not `PublisherClient.publish()` per message: its per-message path (a proto-plus wrapper, a
size probe that builds a whole PublishRequest, a future, flow-control locks) tops out near
10,000 msg/s in one Python process (see docs/benchmarks.md). The scanner batches itself and sends
each batch with the same client's Publish RPC (the GAPIC method `publish()` itself uses, with its
default retry policy): about five times the rate. Confirmations still arrive asynchronously,
per batch, through future callbacks, and a bounded number of batches in flight is the flow control.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import structlog
from google.api_core import exceptions as api_exceptions
from google.api_core import retry as api_retry
from google.cloud import pubsub_v1
from google.pubsub_v1.services.publisher.client import PublisherClient as GapicPublisherClient
from google.pubsub_v1.types import PublishRequest, PublishResponse, PubsubMessage

from processor.errors import MiniScanError, first_line
from processor.stopping import Stopped
from scanner.generator import ScanMessage

_log = structlog.get_logger("scanner")
_RawMessage = PubsubMessage.pb()
_RawRequest = PublishRequest.pb()
_PUBLISH_TIMEOUT_S = 60.0

Confirmed = Callable[[Sequence[ScanMessage], Sequence[str]], None]


class TopicMissing(MiniScanError):
    """The topic to publish to does not exist."""


class PubSubUnreachable(MiniScanError):
    """Pub/Sub did not answer: the one-line reason is the message."""


def check_topic(
    client: pubsub_v1.PublisherClient,
    topic: str,
    timeout: float = 15.0,
    stop: threading.Event | None = None,
) -> None:
    """Raise `TopicMissing` or `PubSubUnreachable` unless `topic` exists and answers; raise
    `Stopped` when `stop` is set while Pub/Sub does not answer."""

    def before_retry(error: Exception) -> None:
        if stop is not None and stop.is_set():
            raise Stopped(f"stopped while waiting for {topic}")
        _log.warning("waiting_for_dependency", dependency="topic", error=str(error).split("\n")[0])

    retry = api_retry.Retry(
        predicate=api_retry.if_exception_type(api_exceptions.ServiceUnavailable),
        initial=0.1,
        maximum=1.0,
        timeout=timeout,
        on_error=before_retry,
    )
    try:
        client.get_topic(request={"topic": topic}, retry=retry, timeout=timeout)
    except api_exceptions.NotFound:
        raise TopicMissing(f"topic {topic} does not exist: run `mini-scan setup` first") from None
    except (api_exceptions.GoogleAPICallError, api_exceptions.RetryError) as exc:
        message = first_line(exc)
        raise PubSubUnreachable(f"cannot reach Pub/Sub for {topic}: {message}") from None


class BatchPublisher:
    """Collects messages into batches of `max_messages` (or `max_latency` seconds) and publishes
    up to `max_in_flight` batches at once; `publish()` blocks while that many are in flight.

    `on_confirmed(messages, message_ids)` runs on a worker thread once a batch is confirmed.
    `close()` publishes what is left and returns after every batch was confirmed or failed.
    """

    def __init__(
        self,
        client: pubsub_v1.PublisherClient,
        topic: str,
        *,
        on_confirmed: Confirmed,
        max_messages: int = 1000,
        max_latency: float = 0.02,
        max_in_flight: int = 8,
    ) -> None:
        self._client = client
        self._topic = topic
        self._on_confirmed = on_confirmed
        self._max_messages = max_messages
        self._max_latency = max_latency
        self._lock = threading.Lock()
        self._batch: list[ScanMessage] = []
        self._batch_started = 0.0
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="scanner-publish")
        self._closed = threading.Event()
        self._failures = threading.Lock()
        self.failed = 0
        self.first_error: str | None = None
        self._flusher = threading.Thread(target=self._flush_late, name="scanner-flush", daemon=True)
        self._flusher.start()

    def publish(self, message: ScanMessage) -> None:
        with self._lock:
            if not self._batch:
                self._batch_started = time.monotonic()
            self._batch.append(message)
            full = self._take() if len(self._batch) >= self._max_messages else None
        if full:
            self._send(full)

    def close(self) -> None:
        self._closed.set()
        self._flusher.join()
        with self._lock:
            rest = self._take()
        if rest:
            self._send(rest)
        self._pool.shutdown(wait=True)  # callbacks run on the workers, so they are done too

    def _take(self) -> list[ScanMessage]:
        batch, self._batch = self._batch, []
        return batch

    def _flush_late(self) -> None:
        # A slow --rate must not leave a message waiting for its batch to fill.
        while not self._closed.wait(self._max_latency / 2):
            with self._lock:
                due = self._batch and time.monotonic() - self._batch_started >= self._max_latency
                late = self._take() if due else None
            if late:
                self._send(late)

    def _send(self, batch: list[ScanMessage]) -> None:
        self._slots.acquire()  # flow control: wait while max_in_flight batches are unconfirmed
        future = self._pool.submit(self._rpc, batch)
        future.add_done_callback(lambda done: self._settle(batch, done))

    def _rpc(self, batch: list[ScanMessage]) -> Sequence[str]:
        raw = _RawRequest(topic=self._topic, messages=[_RawMessage(data=m.data) for m in batch])
        response = GapicPublisherClient.publish(
            self._client, request=PublishRequest.wrap(raw), timeout=_PUBLISH_TIMEOUT_S
        )
        # The raw protobuf's list: proto-plus would wrap each of the 1000 ids on access.
        return list(PublishResponse.pb(response).message_ids)

    def _settle(self, batch: list[ScanMessage], done: Future[Sequence[str]]) -> None:
        try:
            error = done.exception()
            if error is None:
                self._on_confirmed(batch, done.result())
                return
            reason = first_line(error)
            with self._failures:
                self.failed += len(batch)
                self.first_error = self.first_error or reason
            _log.error("publish_failed", messages=len(batch), error=reason)
        finally:
            self._slots.release()
