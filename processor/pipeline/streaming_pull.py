"""The batch-native consumer (CONSUMER=batch): streaming pulls whose responses are handed on
whole, built on the client library's own layers (the GAPIC `streaming_pull`, api-core's `BidiRpc`
and its exponential sleep generator).

Per response, the only per-message work is reading each message's fields; decoding, batching,
acking and leases happen on lists. What the high-level client does for a consumer is done here
too: a stable client id and reconnection with exponential backoff when the service ends a stream
(it does so routinely), server-side flow control on every stream plus local back-pressure,
lease extension, keepalives, and acks split at Pub/Sub's limits (`leases.py`, `dispatcher.py`).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from google.api_core import bidi
from google.api_core import exceptions as google_exceptions
from google.api_core.retry import exponential_sleep_generator
from google.cloud import pubsub_v1

from processor.config import ProcessorSettings
from processor.errors import first_line
from processor.pipeline.leases import Leases
from processor.pipeline.messages import Received
from processor.runtime.logs import excerpt
from processor.runtime.metrics import Metrics

_log = structlog.get_logger("processor.pipeline.streaming_pull")

# The statuses on which the client library reopens a stream; anything else ends it for good.
RETRYABLE = (
    google_exceptions.Aborted,
    google_exceptions.DeadlineExceeded,
    google_exceptions.GatewayTimeout,
    google_exceptions.InternalServerError,
    google_exceptions.ResourceExhausted,
    google_exceptions.ServiceUnavailable,
    google_exceptions.Unknown,
)
STABLE_AFTER_SECONDS = 60.0  # a stream that lived this long starts its backoff afresh


class ExactlyOnceDelivery(Exception):
    """The subscription has exactly-once delivery on, which this consumer does not support."""


class StreamingPull:
    """STREAMS streaming pulls on one subscription, and the leases of what they delivered."""

    def __init__(
        self,
        settings: ProcessorSettings,
        subscriber: pubsub_v1.SubscriberClient,
        metrics: Metrics,
        handle: Callable[[list[Received]], None],
    ) -> None:
        self._leases = Leases(
            subscriber,
            settings.subscription_path,
            settings.lease_seconds,
            settings.max_messages * settings.streams,
            settings.max_bytes * settings.streams,
            metrics,
            keepalive=self._keepalive,
        )
        self._new_stream = lambda: _Stream(
            settings, subscriber, metrics, self._leases, handle, self._on_failure
        )
        self._streams = [self._new_stream() for _ in range(settings.streams)]
        self.failed = threading.Event()

    def start(self) -> None:
        self._leases.start()
        for stream in self._streams:
            stream.start()

    def pause(self) -> None:
        for stream in self._streams:
            stream.stop()
        for stream in self._streams:
            stream.join(5.0)

    def resume(self) -> None:
        self._streams = [self._new_stream() for _ in self._streams]
        for stream in self._streams:
            stream.start()

    def streams_open(self) -> bool:
        return all(stream.open for stream in self._streams)

    def weigh(self, weights: Sequence[tuple[Received, int]]) -> None:
        self._leases.weigh(weights)

    def ack(self, messages: Sequence[Received]) -> None:
        self._leases.ack(messages)

    def nack(self, messages: Sequence[Received]) -> None:
        self._leases.nack(messages)

    def close(self, timeout: float) -> None:
        """Close the streams, hand back what is still held, send the last acks and nacks."""
        deadline = time.monotonic() + timeout
        for stream in self._streams:
            stream.stop()
        for stream in self._streams:
            stream.join(max(0.1, deadline - time.monotonic()))
        self._leases.close(max(0.1, deadline - time.monotonic()))

    def _keepalive(self) -> None:
        for stream in self._streams:
            stream.keepalive()

    def _on_failure(self, error: BaseException) -> None:
        _log.error("stream_ended", error=excerpt(first_line(error)))
        self.failed.set()


class _Stream:
    """One streaming pull in a thread of its own: opens it, reads responses while there is
    room, and reopens it with exponential backoff when it ends with a retryable status."""

    def __init__(
        self,
        settings: ProcessorSettings,
        subscriber: pubsub_v1.SubscriberClient,
        metrics: Metrics,
        leases: Leases,
        handle: Callable[[list[Received]], None],
        on_failure: Callable[[BaseException], None],
    ) -> None:
        self._settings = settings
        self._subscriber = subscriber
        self._metrics = metrics
        self._leases = leases
        self._handle = handle
        self._on_failure = on_failure
        self._client_id = str(uuid.uuid4())  # the same on every reopen, as the client's
        # Pub/Sub routes a streaming pull by this header; the GAPIC layer cannot add it itself.
        self._metadata = [("x-goog-request-params", f"subscription={settings.subscription_path}")]
        self._rpc: bidi.BidiRpc | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="streaming-pull", daemon=True)
        self.open = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        rpc = self._rpc
        if rpc is not None:
            rpc.close()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def keepalive(self) -> None:
        rpc = self._rpc
        if rpc is None or not rpc.is_active:
            return
        try:
            rpc.send(pubsub_v1.types.StreamingPullRequest())
        except Exception as exc:  # the stream is ending; the reader thread will reopen it
            _log.debug("keepalive_failed", error=str(exc))

    def _initial_request(self) -> Any:
        settings = self._settings
        return pubsub_v1.types.StreamingPullRequest(
            subscription=settings.subscription_path,
            stream_ack_deadline_seconds=settings.lease_seconds,
            client_id=self._client_id,
            max_outstanding_messages=settings.max_messages,
            max_outstanding_bytes=settings.max_bytes,
        )

    def _run(self) -> None:
        backoff = exponential_sleep_generator(initial=0.1, maximum=10.0, multiplier=2.0)
        while not self._stop.is_set():
            opened_at = time.monotonic()
            error = self._read_until_it_ends()
            self.open = False
            if self._stop.is_set():
                return
            if not isinstance(error, RETRYABLE):
                self._on_failure(error)
                return
            if time.monotonic() - opened_at >= STABLE_AFTER_SECONDS:
                backoff = exponential_sleep_generator(initial=0.1, maximum=10.0, multiplier=2.0)
            delay = next(backoff)
            self._metrics.stream_reconnects.inc()
            _log.warning(
                "stream_reconnecting",
                retry_in_s=round(delay, 2),
                error=excerpt(first_line(error)),
            )
            self._stop.wait(delay)

    def _read_until_it_ends(self) -> BaseException:
        """Open the stream and hand on its responses; the error that ended it."""
        rpc = bidi.BidiRpc(
            self._subscriber.streaming_pull,
            initial_request=self._initial_request,
            metadata=self._metadata,
        )
        self._rpc = rpc
        try:
            rpc.open()
            self.open = True
            while not self._stop.is_set():
                self._leases.wait_for_room(self._stop)
                response = rpc.recv()
                self._on_response(pubsub_v1.types.StreamingPullResponse.pb(response))
        except StopIteration:  # the service never ends a stream with OK: treat it as a reset
            return google_exceptions.ServiceUnavailable("the stream ended without a status")
        except Exception as exc:
            return exc
        finally:
            rpc.close()
        return google_exceptions.Cancelled("stopped")

    def _on_response(self, response: Any) -> None:
        """One response: its messages, each read once, held and handed on as one list."""
        if response.subscription_properties.exactly_once_delivery_enabled:
            raise ExactlyOnceDelivery(
                "the subscription has exactly-once delivery enabled; CONSUMER=batch does not "
                "support it (disable it, or set CONSUMER=client)"
            )
        received = []
        for item in response.received_messages:
            message, published = item.message, item.message.publish_time
            received.append(
                Received(
                    item.ack_id,
                    message.message_id,
                    message.data,
                    message.attributes,
                    published.seconds + published.nanos * 1e-9,
                )
            )
        if received:
            self._leases.add(received)
            self._handle(received)
