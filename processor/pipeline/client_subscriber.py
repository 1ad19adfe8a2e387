"""The client library's `subscribe()` as a consumer (CONSUMER=client).

The client runs its own streams, leases and flow control and calls back once per message; each
message becomes a one-element delivery for the shared path. Kept beside the batch-native
consumer as the reference implementation: it costs several times more CPU per message.

Closing the client's streams also ends its lease and ack machinery, so a pause (a long database
outage, a stop) adopts what is still unsettled: its leases are extended and its acks and nacks
sent by the batch consumer's own leases and dispatcher until it is settled. The client does not
notice a deaf stream; the batch consumer's watch (`stream_watch.py`) does, and reopens them all.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
from google.api_core import exceptions as google_exceptions
from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.subscriber._protocol.streaming_pull_manager import (
    StreamingPullManager,
)
from google.cloud.pubsub_v1.subscriber.futures import StreamingPullFuture
from google.cloud.pubsub_v1.subscriber.scheduler import ThreadScheduler

from processor.config import ProcessorSettings
from processor.errors import first_line
from processor.pipeline.dispatcher import Dispatcher
from processor.pipeline.leases import Leases
from processor.pipeline.messages import Received
from processor.pipeline.stream_watch import StreamWatch
from processor.runtime.metrics import Metrics

_log = structlog.get_logger("processor.pipeline.client_subscriber")


class ClientSubscriber:
    """Streams opened with `SubscriberClient.subscribe()`; acks and nacks per message."""

    def __init__(
        self,
        settings: ProcessorSettings,
        subscriber: pubsub_v1.SubscriberClient,
        handle: Callable[[list[Received]], None],
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._subscriber = subscriber
        self._handle = handle
        self._streams: list[_Subscription] = []
        self._restarting = threading.Lock()
        self._metrics = metrics
        self._closing = False
        self.failed = threading.Event()
        # Delivered, not yet acked or nacked: what a pause must keep leased.
        self._unsettled: dict[str, Received] = {}
        self._lock = threading.Lock()
        self._dispatcher = Dispatcher(
            subscriber, settings.subscription_path, settings.lease_seconds, metrics
        )
        self._adopted = Leases(
            self._dispatcher, settings.lease_seconds, 1 << 62, 1 << 62, keepalive=lambda: None
        )
        self._adopted_ids: set[str] = set()
        self._bounded = BoundedRequests(subscriber, self._dispatcher)
        self._started = False
        limit = settings.max_messages * settings.streams
        self._watch = StreamWatch(
            subscriber,
            settings.subscription_path,
            light=lambda: len(self._unsettled) < limit / 2,
            streams=lambda: list(self._streams),
            hand_back=self._dispatcher.nack,
        )

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._dispatcher.start()
            self._adopted.start()
            self._watch.start()
        # Each lease extension, and the stream's ack deadline, is short: a killed processor's
        # messages return in seconds. The client's own maximum lease is set past ours, so the
        # processor, not the client, decides what happens to a message held that long.
        flow = pubsub_v1.types.FlowControl(
            max_messages=self._settings.max_messages,
            max_bytes=self._settings.max_bytes,
            max_lease_duration=self._settings.max_lease_seconds + 2 * self._settings.lease_seconds,
            max_duration_per_lease_extension=self._settings.lease_seconds,
        )
        self._closing = False
        for _ in range(self._settings.streams):
            # The callback never blocks (it decodes and queues), so one thread per stream keeps
            # up; the client's default of ten only adds GIL contention.
            executor = ThreadPoolExecutor(
                self._settings.callback_threads, thread_name_prefix="pubsub-callback"
            )
            stream = _Subscription(self)
            stream.future = open_stream(
                self._bounded,
                self._settings.subscription_path,
                functools.partial(self._on_message, stream),
                flow,
                ThreadScheduler(executor),
            )
            stream.future.add_done_callback(self._on_stream_end)
            self._streams.append(stream)

    def streams_open(self) -> bool:
        return bool(self._streams) and all(stream.open for stream in self._streams)

    def alive(self) -> bool:
        """The client runs its own threads; ours keep a pause's leases and watch the streams."""
        return not self._started or (
            self._dispatcher.alive() and self._adopted.alive() and self._watch.alive()
        )

    def recycle(self, stream: _Subscription, cause: str) -> None:
        """Reopen every stream (once, whichever deaf one asks), keeping what they delivered."""
        with self._restarting:
            if stream not in self._streams:
                return  # already reopened, or paused
            self.pause()
            self.start()
        self._metrics.stream_reconnects.labels(cause=cause).inc()

    def weigh(self, weights: Sequence[tuple[Received, int]]) -> None:
        """The client's flow control counts each message's data only; nothing to add here."""

    def ack(self, messages: Sequence[Received]) -> None:
        theirs, ours = self._split(messages)
        for message in theirs:
            message.handle.ack()
        if ours:
            self._adopted.ack(ours)

    def nack(self, messages: Sequence[Received]) -> None:
        theirs, ours = self._split(messages)
        for message in theirs:
            message.handle.nack()
        if ours:
            self._adopted.nack(ours)

    def pause(self) -> None:
        """Close the client's streams and adopt what they delivered and is not settled."""
        self._close_streams(timeout=5.0)
        with self._lock:
            adopted, self._unsettled = list(self._unsettled.values()), {}
            self._adopted_ids.update(m.ack_id for m in adopted)
        if adopted:
            self._adopted.add(adopted)
            self._dispatcher.extend([m.ack_id for m in adopted])  # now: the client's lease ends

    def resume(self) -> None:
        self.start()

    def close(self, timeout: float) -> None:
        """Close the streams (the client sends the acks and nacks still queued), hand back
        what a pause adopted."""
        self._close_streams(timeout)
        if self._started:
            self._watch.stop()
            self._adopted.close()
            self._dispatcher.close(max(0.1, timeout))

    def _split(self, messages: Sequence[Received]) -> tuple[list[Received], list[Received]]:
        """`messages` as (those the client still leases, those a pause adopted)."""
        with self._lock:
            for message in messages:
                self._unsettled.pop(message.ack_id, None)
            if not self._adopted_ids:
                return list(messages), []
            ours = {m.ack_id for m in messages if m.ack_id in self._adopted_ids}
            self._adopted_ids -= ours
        if not ours:
            return list(messages), []
        return [m for m in messages if m.ack_id not in ours], [
            m for m in messages if m.ack_id in ours
        ]

    def _close_streams(self, timeout: float) -> None:
        self._closing = True
        futures = [stream.future for stream in self._streams]
        self._streams = []
        for future in futures:
            future.cancel()
        for future in futures:
            # A cancelled stream may report how it ended; there is nothing left to do about it.
            with contextlib.suppress(Exception):
                future.result(timeout=max(0.1, timeout))

    def _on_message(self, stream: _Subscription, message: Any) -> None:
        stream.heard_at = time.monotonic()
        received = Received(
            message.ack_id,
            message.message_id,
            message.data,
            dict(message.attributes),
            message.publish_time.timestamp(),
            _detached(message),
        )
        with self._lock:
            late = self._closing  # a callback that ran on while its stream closed
            if late:
                self._adopted_ids.add(received.ack_id)
            else:
                self._unsettled[received.ack_id] = received
        if late:
            self._adopted.add([received])
        self._handle([received])

    def _on_stream_end(self, future: Any) -> None:
        if self._closing:
            return  # we closed it
        error = future.exception()
        _log.error("stream_ended", error=first_line(error) if error else "no error")
        self.failed.set()


_DETACHED = pubsub_v1.types.PubsubMessage.pb()()


def _detached(message: Any) -> Any:
    """The client's message, kept to ack or nack it, without its protobuf.

    The client builds each message on the parsed streaming-pull response, and keeps the
    protobuf and its attributes (a view into that response): held, one message keeps the whole
    response alive, while flow control counts only the message's own size. A message held
    long (its dead letter on a slow publish) would pin a response each. Acking and nacking use
    only its ack id, size and ordering key, read when it was built; its data is already a copy.
    """
    message._message = _DETACHED
    message._attributes = {}
    return message


class _ReleasingManager(StreamingPullManager):
    """The client's stream manager, releasing messages it holds back whenever its load allows.

    The client holds back ("on hold") what a response brings beyond its flow control, and
    releases those messages only when the next response arrives or, while its consumer is
    paused, when an ack lowers the load. After a stream reset the service fills the new
    stream's window while the old stream's messages are still in hand, so messages go on hold;
    if acks lower the load between `_on_response` holding them and its pause check, the
    consumer is never paused, nothing releases them, and at the end of a backlog no response
    comes: they stay leased (extended) forever. Issue 21: 580 messages extended for 190 s.
    Releasing on every ack, paused or not, closes that gap (acks are what lower the load).
    """

    def maybe_resume_consumer(self) -> None:
        with self._pause_resume_lock:
            if self._scheduler is not None and self._leaser is not None:
                self._maybe_release_messages()
        super().maybe_resume_consumer()


class BoundedRequests:
    """The subscriber as the client's stream manager sees it: its acks and lease extensions
    leave with the dispatcher's deadline and retry (a third of a lease in all), not the
    client's 60 s, and a request that runs out of time fails as a plain API error.

    The manager sends acks and extensions as unary requests, each retried for up to 60 s on
    UNAVAILABLE; when the retries run out it closes the whole stream manager (a `RetryError`),
    which the processor takes for a fatal stream end and exits. Behind a connection gone
    silent, gRPC keepalive declares it dead after 40-70 s and the requests waiting on it fail
    with UNAVAILABLE just after their 60 s are up: the processor stopped. Bounded, a request
    on a dead connection fails in seconds as `DeadlineExceeded`, which the manager treats as
    best effort (a lost ack is a redelivery), and the streams reopen once keepalive ends the
    connection.
    """

    def __init__(self, subscriber: pubsub_v1.SubscriberClient, dispatcher: Dispatcher) -> None:
        self._subscriber = subscriber
        self._retry, self._deadline = dispatcher.retry, dispatcher.deadline
        self.streaming_pull = subscriber.streaming_pull

    @property
    def open_telemetry_enabled(self) -> bool:
        return self._subscriber.open_telemetry_enabled

    def acknowledge(self, **request: Any) -> None:
        self._send(self._subscriber.acknowledge, request)

    def modify_ack_deadline(self, **request: Any) -> None:
        self._send(self._subscriber.modify_ack_deadline, request)

    def _send(self, method: Callable[..., Any], request: dict[str, Any]) -> None:
        try:
            method(**request, retry=self._retry, timeout=self._deadline)
        except google_exceptions.RetryError as exc:
            cause = exc.cause
            if isinstance(cause, google_exceptions.GoogleAPICallError):
                raise cause from exc
            raise google_exceptions.DeadlineExceeded(str(exc)) from exc


def open_stream(
    subscriber: pubsub_v1.SubscriberClient | BoundedRequests,
    subscription: str,
    callback: Callable[[Any], None],
    flow_control: pubsub_v1.types.FlowControl,
    scheduler: ThreadScheduler | None,
) -> StreamingPullFuture:
    """`SubscriberClient.subscribe()`, on the manager above (the same steps it takes)."""
    manager = _ReleasingManager(
        subscriber, subscription, flow_control=flow_control, scheduler=scheduler
    )
    future = StreamingPullFuture(manager)
    manager.open(callback=callback, on_callback_error=future.set_exception)
    return future


class _Subscription:
    """One `subscribe()` stream as the watch sees it."""

    def __init__(self, owner: ClientSubscriber) -> None:
        self._owner = owner
        self.future: Any = None
        self.heard_at = time.monotonic()  # its last message, or its opening
        self.suspect = False

    @property
    def open(self) -> bool:
        return self.future is not None and not self.future.done()

    def recycle(self, cause: str) -> None:
        self._owner.recycle(self, cause)
