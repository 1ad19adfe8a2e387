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
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import structlog
from google.api_core import bidi
from google.api_core import exceptions as google_exceptions
from google.api_core.retry import exponential_sleep_generator
from google.cloud import pubsub_v1

from processor.config import ProcessorSettings
from processor.errors import first_line
from processor.pipeline.dispatcher import Dispatcher
from processor.pipeline.leases import Leases
from processor.pipeline.messages import Received
from processor.pipeline.stream_watch import StreamWatch
from processor.runtime.logs import excerpt, supervised_thread
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
_NO_ATTRIBUTES: Mapping[str, str] = MappingProxyType({})


class ExactlyOnceDelivery(Exception):
    """The subscription has exactly-once delivery on, which this consumer does not support."""


class StreamingPull:
    """STREAMS streaming pulls on one subscription, the leases of what they delivered, and a
    watch that reopens a stream gone deaf."""

    def __init__(
        self,
        settings: ProcessorSettings,
        subscriber: pubsub_v1.SubscriberClient,
        metrics: Metrics,
        handle: Callable[[list[Received]], None],
    ) -> None:
        self._dispatcher = Dispatcher(
            subscriber,
            settings.subscription_path,
            settings.lease_seconds,
            metrics,
            on_timeout=self._on_request_timeout,
            on_answer=self._on_request_answered,
        )
        self._leases = Leases(
            self._dispatcher,
            settings.lease_seconds,
            settings.max_messages * settings.streams,
            settings.max_bytes * settings.streams,
            keepalive=self._keepalive,
        )
        self._new_stream = lambda: _Stream(
            settings, subscriber, metrics, self._leases, handle, self._on_failure
        )
        self._streams = [self._new_stream() for _ in range(settings.streams)]
        self._watch = StreamWatch(
            subscriber,
            settings.subscription_path,
            light=lambda: self._leases.below(0.5 / settings.streams),
            streams=lambda: list(self._streams),
            hand_back=self._dispatcher.nack,
        )
        self.failed = threading.Event()

    def start(self) -> None:
        self._dispatcher.start()
        self._leases.start()
        for stream in self._streams:
            stream.start()
        self._watch.start()

    def pause(self) -> None:
        """Close the streams, within 5 s in all; what is held stays leased."""
        deadline = time.monotonic() + 5.0
        for stream in self._streams:
            stream.stop()
        for stream in self._streams:
            stream.join(max(0.1, deadline - time.monotonic()))

    def resume(self) -> None:
        self._streams = [self._new_stream() for _ in self._streams]
        for stream in self._streams:
            stream.start()

    def streams_open(self) -> bool:
        """At least one stream is open and not suspected deaf."""
        return any(stream.open and not stream.suspect for stream in self._streams)

    def alive(self) -> bool:
        """Every thread runs: the dispatcher's, the lease schedule, the watch, and each
        stream's reader (which ends only on stop, or on a failure that sets `failed`)."""
        return (
            self._dispatcher.alive()
            and self._leases.alive()
            and self._watch.alive()
            and all(stream.alive() for stream in self._streams)
        )

    def weigh(self, weights: Sequence[tuple[Received, int]]) -> None:
        self._leases.weigh(weights)

    def ack(self, messages: Sequence[Received]) -> None:
        self._leases.ack(messages)

    def nack(self, messages: Sequence[Received]) -> None:
        self._leases.nack(messages)

    def close(self, timeout: float) -> None:
        """Close the streams, hand back what is still held, send the last acks and nacks."""
        deadline = time.monotonic() + timeout
        self._watch.stop()
        for stream in self._streams:
            stream.stop()
        for stream in self._streams:
            stream.join(max(0.1, deadline - time.monotonic()))
        self._leases.close()
        self._dispatcher.close(max(0.1, deadline - time.monotonic()))

    def _keepalive(self) -> None:
        for stream in self._streams:
            stream.keepalive()

    def _on_request_timeout(self) -> None:
        # An ack or extension unanswered past its deadline: the connection under every stream
        # is suspect (not ready) until one of them hears from the service again.
        for stream in self._streams:
            stream.suspect = True

    def _on_request_answered(self) -> None:
        for stream in self._streams:
            stream.suspect = False

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
        self._recycled: str | None = None  # why the watch closed the stream, to reopen it
        self._thread = supervised_thread(self._reconnect_until_stopped, "streaming-pull")
        self.open = False
        self.suspect = False  # requests on its connection go unanswered: not ready
        self.heard_at = time.monotonic()  # when the service last sent a response (or opened)
        self._ended = False  # a failure was reported (`failed` set): not a dead thread

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        rpc = self._rpc
        if rpc is not None:
            rpc.close()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def alive(self) -> bool:
        """The reader runs, is about to, or ended as it should (stopped, a failure reported)."""
        thread = self._thread
        return thread.ident is None or thread.is_alive() or self._stop.is_set() or self._ended

    def recycle(self, cause: str) -> None:
        """Close the stream (not the reader): it reopens at once, counted under `cause`."""
        self._recycled = cause
        rpc = self._rpc
        if rpc is not None:
            rpc.close()

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

    def _reconnect_until_stopped(self) -> None:
        backoff = exponential_sleep_generator(initial=0.1, maximum=10.0, multiplier=2.0)
        while not self._stop.is_set():
            opened_at = time.monotonic()
            error = self._read_until_it_ends()
            self.open = False
            if self._stop.is_set():
                return
            cause, self._recycled = self._recycled or _cause(error), None
            if cause == "fatal":
                self._ended = True
                self._on_failure(error)
                return
            if time.monotonic() - opened_at >= STABLE_AFTER_SECONDS:
                backoff = exponential_sleep_generator(initial=0.1, maximum=10.0, multiplier=2.0)
            delay = next(backoff)
            self._metrics.stream_reconnects.labels(cause=cause).inc()
            _log.warning(
                "stream_reconnecting",
                cause=cause,
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
            self.open, self.suspect, self.heard_at = True, False, time.monotonic()
            while not self._stop.is_set():
                self._leases.wait_for_room(self._stop)
                response = rpc.recv()
                self.heard_at = time.monotonic()
                self.suspect = False
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
            attributes = message.attributes
            received.append(
                Received(
                    item.ack_id,
                    message.message_id,
                    message.data,
                    # A copy: the map is a view that keeps the whole response alive, which
                    # flow control (counting each message's data) does not see.
                    dict(attributes) if attributes else _NO_ATTRIBUTES,
                    published.seconds + published.nanos * 1e-9,
                )
            )
        if received:
            self._leases.add(received)
            self._handle(received)


def _cause(error: BaseException) -> str:
    """Why a stream ended, as the reconnect metric's label: its status (lower case) when the
    client library would reopen it, "fatal" otherwise."""
    if not isinstance(error, RETRYABLE):
        return "fatal"
    code = getattr(error, "grpc_status_code", None)
    return code.name.lower() if code is not None else "unknown"
