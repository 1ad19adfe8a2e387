"""The streaming-pull consumer: streams in, decoded observations to the batcher, shutdown.

Per message (in the client's callback threads): decode; a rejection goes to the dead-letter
topic, an observation to the batcher. Per batch (in the writer thread): commit, then ack.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.subscriber.scheduler import ThreadScheduler

from processor.batcher import Batcher, Held
from processor.config import ProcessorSettings
from processor.deadletter import DeadLetters
from processor.observability import Metrics
from processor.schema import Rejection, decode
from processor.store import Repository
from processor.writer import Writer

_log = structlog.get_logger("processor.consumer")


class Processor:
    """One process's consumer: `start()`, then `shutdown()` when asked to stop."""

    def __init__(
        self,
        settings: ProcessorSettings,
        repository: Repository,
        subscriber: pubsub_v1.SubscriberClient,
        publisher: pubsub_v1.PublisherClient,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._subscriber = subscriber
        self._metrics = metrics
        self._max_skew = settings.max_skew_seconds
        self._max_bytes = settings.max_message_bytes
        self._batcher = Batcher(settings.batch_size, settings.batch_max_wait_ms / 1000)
        self._dead_letters = DeadLetters(
            publisher, settings.dead_letter_topic_path, settings.subscription_path, metrics
        )
        self._writer = Writer(self._batcher, repository, self._dead_letters, metrics)
        self._streams: list[Any] = []
        self.stream_failed = threading.Event()

    def start(self) -> Processor:
        self._writer.start()
        # Leases are extended for as long as a message is held (an hour at most, the client's
        # default: through any database outage shorter than that), but each extension, and the
        # stream's ack deadline, is short: a killed processor's messages return in seconds.
        flow = pubsub_v1.types.FlowControl(
            max_messages=self._settings.max_messages,
            max_bytes=self._settings.max_bytes,
            max_duration_per_lease_extension=self._settings.lease_seconds,
        )
        for _ in range(self._settings.streams):
            # The callback never blocks (it decodes and queues), so a couple of threads per
            # stream keep up; the client's default of ten only adds GIL contention.
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
            self._streams.append(future)
        self._metrics.database_up.set(1)
        _log.info("streams_open", streams=len(self._streams))
        return self

    def ready(self) -> bool:
        """Streams open and the database taking writes."""
        streams_open = bool(self._streams) and not any(f.done() for f in self._streams)
        ready = streams_open and self._writer.database_up and not self._batcher.closed
        self._metrics.ready.set(1 if ready else 0)
        return ready

    def shutdown(self, grace: float) -> bool:
        """Stop taking messages, commit and ack what is held, hand back the rest, close the
        streams; within `grace` seconds. True if everything held was committed."""
        deadline = time.monotonic() + grace
        self._batcher.close()  # from now on the callback hands every new message back
        # Keep a margin for closing the streams, which sends the last acks and nacks.
        flushed = self._writer.join(timeout=max(0.0, deadline - time.monotonic() - 2.0))
        if not flushed:
            self._writer.hand_back(self._writer.abandon() + self._batcher.drain())
            self._writer.join(timeout=0.5)
        self._dead_letters.wait(timeout=max(0.1, min(2.0, deadline - time.monotonic() - 1.0)))
        for future in self._streams:
            future.cancel()
        for future in self._streams:
            # A cancelled stream may report how it ended; there is nothing left to do about it.
            with contextlib.suppress(Exception):
                future.result(timeout=max(0.1, deadline - time.monotonic()))
        _log.info("shutdown_complete", flushed=flushed)
        return flushed

    def _on_message(self, message: Any) -> None:
        try:
            self._metrics.received.inc()
            try:
                observation = decode(
                    message.data, max_skew=self._max_skew, max_bytes=self._max_bytes
                )
            except Rejection as rejection:
                self._dead_letters.send(message, rejection.reason, rejection.message)
                return
            if not self._batcher.add(Held(message, observation)):
                message.nack()
                self._metrics.nacked.inc()
        except Exception:  # never let a message sit leased until its lease runs out
            _log.exception("callback_failed", message_id=message.message_id)
            message.nack()
            self._metrics.nacked.inc()

    def _on_stream_end(self, future: Any) -> None:
        if self._batcher.closed:
            return  # we closed it
        error = future.exception()
        _log.error("stream_ended", error=str(error).splitlines()[0] if error else "no error")
        self.stream_failed.set()
