"""The client library's `subscribe()` as a consumer (CONSUMER=client).

The client runs its own streams, leases and flow control and calls back once per message; each
message becomes a one-element delivery for the shared path. Kept beside the batch-native
consumer as the reference implementation: it costs several times more CPU per message.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.subscriber._protocol.streaming_pull_manager import (
    StreamingPullManager,
)
from google.cloud.pubsub_v1.subscriber.futures import StreamingPullFuture
from google.cloud.pubsub_v1.subscriber.scheduler import ThreadScheduler

from processor.config import ProcessorSettings
from processor.errors import first_line
from processor.pipeline.messages import Received

_log = structlog.get_logger("processor.pipeline.client_subscriber")


class ClientSubscriber:
    """Streams opened with `SubscriberClient.subscribe()`; acks and nacks per message."""

    def __init__(
        self,
        settings: ProcessorSettings,
        subscriber: pubsub_v1.SubscriberClient,
        handle: Callable[[list[Received]], None],
    ) -> None:
        self._settings = settings
        self._subscriber = subscriber
        self._handle = handle
        self._futures: list[Any] = []
        self._closing = False
        self.failed = threading.Event()

    def start(self) -> None:
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
            future = open_stream(
                self._subscriber,
                self._settings.subscription_path,
                self._on_message,
                flow,
                ThreadScheduler(executor),
            )
            future.add_done_callback(self._on_stream_end)
            self._futures.append(future)

    def streams_open(self) -> bool:
        return bool(self._futures) and not any(f.done() for f in self._futures)

    def weigh(self, weights: Sequence[tuple[Received, int]]) -> None:
        """The client's flow control counts each message's data only; nothing to add here."""

    def ack(self, messages: Sequence[Received]) -> None:
        for message in messages:
            message.handle.ack()

    def nack(self, messages: Sequence[Received]) -> None:
        for message in messages:
            message.handle.nack()

    def pause(self) -> None:
        self.close(timeout=5.0)

    def resume(self) -> None:
        self.start()

    def close(self, timeout: float) -> None:
        """Close the streams (the client sends the acks and nacks still queued)."""
        self._closing = True
        futures, self._futures = self._futures, []
        for future in futures:
            future.cancel()
        for future in futures:
            # A cancelled stream may report how it ended; there is nothing left to do about it.
            with contextlib.suppress(Exception):
                future.result(timeout=max(0.1, timeout))

    def _on_message(self, message: Any) -> None:
        received = Received(
            message.ack_id,
            message.message_id,
            message.data,
            message.attributes,
            message.publish_time.timestamp(),
            message,
        )
        self._handle([received])

    def _on_stream_end(self, future: Any) -> None:
        if self._closing:
            return  # we closed it
        error = future.exception()
        _log.error("stream_ended", error=first_line(error) if error else "no error")
        self.failed.set()


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


def open_stream(
    subscriber: pubsub_v1.SubscriberClient,
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
