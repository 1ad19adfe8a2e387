"""The processor: a source's deliveries decoded, observations batched and committed by the
writer, rejections dead-lettered; and the ack policy, decided here and nowhere else.

The ack policy (every ack and nack the processor sends is one of these):
- a message whose row committed: ack, after the commit (`committed`);
- a message the decoder rejects, or whose row the database refuses (a bad row, not a bad
  table): published to the dead-letter topic with its reason, then ack once that publish is
  confirmed; nack if the publish failed, so it comes again (`_dead_letter_settled`);
- a message that cannot be placed (a decode bug, the batcher closed at shutdown, a long outage,
  a batch the writer gave up on at shutdown): nack, so another processor gets it (`hand_back`).
A source settles nothing on its own, except that closing it hands back (nacks) whatever it
still holds: a lease is never left to lapse.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence

import structlog
from google.cloud import pubsub_v1

from processor.config import ProcessorSettings
from processor.pipeline.batcher import Batcher
from processor.pipeline.client_subscriber import ClientSubscriber
from processor.pipeline.deadletter import DeadLetters
from processor.pipeline.messages import Held, Received
from processor.pipeline.refusals import Refused
from processor.pipeline.source import Source
from processor.pipeline.streaming_pull import StreamingPull
from processor.pipeline.writer import Writer
from processor.runtime.metrics import Metrics
from processor.schema import Reason, Rejection, decode
from processor.storage import Repository

_log = structlog.get_logger("processor.pipeline.processor")

LARGE_MESSAGE_BYTES = 64 * 1024  # below this, a decoded message's size is not worth weighing


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
        self._metrics = metrics
        self._max_skew = settings.max_skew_seconds
        self._max_bytes = settings.max_message_bytes
        self._source: Source = _source(settings, subscriber, metrics, self.handle)
        self._batcher = Batcher(settings.batch_size, settings.batch_max_wait_ms / 1000)
        self._dead_letters = DeadLetters(
            publisher,
            settings.dead_letter_topic_path,
            settings.subscription_path,
            self._dead_letter_settled,
            metrics,
        )
        self._writer = Writer(
            self._batcher,
            repository,
            self,
            metrics,
            database_timeout=settings.database_timeout,
            stall_seconds=settings.writer_stall_seconds,
        )
        self._paused_at: int | None = None  # the writer's commit count when streams paused
        self._received = self._nacked = 0  # counted here too, for the shutdown's log line

    @property
    def stream_failed(self) -> threading.Event:
        return self._source.failed

    def start(self) -> Processor:
        self._writer.start()
        self._source.start()
        self._metrics.database_up.set(1)
        # Named after the source actually built, not the setting: tests read it to know which
        # consumer ran.
        consumer = "client" if isinstance(self._source, ClientSubscriber) else "batch"
        self._metrics.consumer.labels(consumer=consumer).set(1)
        _log.info("streams_open", streams=self._settings.streams, consumer=consumer)
        return self

    def handle(self, deliveries: list[Received]) -> None:
        """Decode deliveries: observations to the batcher in one hand-off, rejections to the
        dead-letter topic. Never raises: a message it cannot place is handed back."""
        self._metrics.received.inc(len(deliveries))
        self._received += len(deliveries)
        held, unplaced, weights = [], [], []
        for received in deliveries:
            try:
                observation = decode(
                    received.data, max_skew=self._max_skew, max_bytes=self._max_bytes
                )
                held.append(Held(received, observation))
                if len(received.data) > LARGE_MESSAGE_BYTES:
                    # A decoded response can take up to 4 bytes a character: flow control
                    # must count it, or large messages would hold several times MAX_BYTES.
                    weights.append((received, sys.getsizeof(observation.response)))
            except Rejection as rejection:
                self._dead_letters.send(received, rejection.reason, rejection.message)
            except Exception:  # a bug must not leave a message leased until its lease runs out
                _log.exception("decode_failed", message_id=received.message_id)
                unplaced.append(received)
        if weights:
            self._source.weigh(weights)
        if held and not self._batcher.add_many(held):
            unplaced += [h.received for h in held]
        if unplaced:
            self._nack(unplaced)

    # --- the ack policy ---------------------------------------------------------------------

    def committed(self, batch: Sequence[Held], refused: Refused) -> None:
        """The writer committed `batch`'s rows except the `refused` ones."""
        refused_ids = {id(held) for held, _ in refused}
        self._ack([held.received for held in batch if id(held) not in refused_ids])
        for held, error in refused:
            self._dead_letters.send(held.received, Reason.STORAGE_REJECTED, error)

    def hand_back(self, batch: Sequence[Held]) -> None:
        """Messages not stored and not kept: back to Pub/Sub for another processor."""
        self._nack([held.received for held in batch])
        _log.warning("batch_handed_back", messages=len(batch))

    def _dead_letter_settled(self, message: Received, published: bool) -> None:
        if published:
            self._ack([message])
        else:
            self._nack([message])

    def _ack(self, messages: list[Received]) -> None:
        self._source.ack(messages)
        self._metrics.acked.inc(len(messages))

    def _nack(self, messages: list[Received]) -> None:
        self._source.nack(messages)
        self._metrics.nacked.inc(len(messages))
        self._nacked += len(messages)

    # --- running ------------------------------------------------------------------------------

    def supervise(self) -> None:
        """Run twice a second by the main loop: the ready gauge and the long-outage rule.

        A message must not wait for its commit longer than MAX_LEASE_SECONDS. Past it (a
        database outage, a stuck writer), the processor keeps only the batch the writer is
        retrying, hands back everything else and closes its streams, so that Pub/Sub keeps the
        messages (one delivery attempt per outage, not one per lease) and memory stays at one
        batch; the streams reopen once that batch commits.
        """
        if self._paused_at is None:
            if self._batcher.oldest_age() >= self._settings.max_lease_seconds:
                self._pause()
        elif self._writer.commits > self._paused_at:
            self._paused_at = None
            self._source.resume()
            self._metrics.streams_paused.set(0)
            _log.info("streams_resumed")
        self._metrics.held.set(len(self._batcher) + self._writer.holding)
        self.ready()

    def _pause(self) -> None:
        self._paused_at = self._writer.commits
        self._source.pause()
        handed_back = self._batcher.drain()
        if handed_back:
            self.hand_back(handed_back)
        self._metrics.streams_paused.set(1)
        _log.warning(
            "streams_paused",
            why=f"messages held {self._settings.max_lease_seconds}s without a commit",
            handed_back=len(handed_back),
            kept=self._writer.holding,
        )

    def alive(self) -> bool:
        """For /healthz: the writer runs and is not stuck (`Writer.alive`), and every thread of
        the source runs (stream readers, lease schedule, dispatcher, watch)."""
        return self._writer.alive() and self._source.alive()

    def ready(self) -> bool:
        """Streams open and the database taking writes."""
        ready = (
            self._source.streams_open() and self._writer.database_up and not self._batcher.closed
        )
        self._metrics.ready.set(1 if ready else 0)
        return ready

    def shutdown(self, grace: float) -> bool:
        """Stop the streams, commit and ack what is held, hand back the rest, close the source;
        within `grace` seconds. True if everything held was committed.

        The streams stop first (their leases kept), so that nothing arrives after the signal
        only to be decoded and handed back: a stop costs no extra delivery attempts."""
        deadline = time.monotonic() + grace
        received, nacked = self._received, self._nacked
        if self._paused_at is None:
            self._source.pause()
        self._batcher.close()  # from now on any late delivery is handed back
        # Keep a margin for closing the streams, which sends the last acks and nacks.
        flushed = self._writer.join(timeout=max(0.0, deadline - time.monotonic() - 2.0))
        if not flushed:
            self.hand_back(self._writer.abandon() + self._batcher.drain())
            self._writer.join(timeout=0.5)
        self._dead_letters.wait(timeout=max(0.1, min(2.0, deadline - time.monotonic() - 1.0)))
        self._source.close(timeout=max(0.1, deadline - time.monotonic()))
        _log.info(
            "shutdown_complete",
            flushed=flushed,
            received_after_stop=self._received - received,
            handed_back_at_stop=self._nacked - nacked,
        )
        return flushed


def _source(
    settings: ProcessorSettings,
    subscriber: pubsub_v1.SubscriberClient,
    metrics: Metrics,
    handle: Callable[[list[Received]], None],
) -> Source:
    if settings.consumer == "client":
        return ClientSubscriber(settings, subscriber, handle, metrics)
    return StreamingPull(settings, subscriber, metrics, handle)
