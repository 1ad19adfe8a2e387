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
            future = self._subscriber.subscribe(
                self._settings.subscription_path,
                self._on_message,
                flow_control=flow,
                scheduler=ThreadScheduler(executor),
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
