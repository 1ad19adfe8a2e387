"""Telling an idle subscription from a deaf stream.

The rule it owns: a stream that has heard nothing for SILENT_SECONDS while the consumer has
room, and whose subscription has messages ready (a one-message unary Pull finds one), is deaf
(the service, or something between, stopped serving it without ending it) and is closed to
reopen. An idle subscription has nothing ready, so its streams are left alone. The probe's
message is handed back at once: one redelivery per deaf stream found. A dead connection is
gRPC keepalive's job (runtime/pubsub.py); this catches a stream that dies alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import structlog
from google.api_core import exceptions as google_exceptions
from google.cloud import pubsub_v1

from processor.errors import first_line
from processor.runtime.logs import excerpt, supervised_thread

_log = structlog.get_logger("processor.pipeline.stream_watch")

SILENT_SECONDS = 15.0  # a stream quiet this long, with room to receive, is worth a probe
CHECK_SECONDS = 5.0  # how often the watch looks
PROBE_SECONDS = 5.0  # the probe's deadline (an idle subscription may answer only at it)


class Watched(Protocol):
    """A stream as the watch sees it."""

    open: bool
    suspect: bool
    heard_at: float  # monotonic time of its last response, or of its opening

    def recycle(self, cause: str) -> None: ...


class StreamWatch:
    """A thread (`stream-watch`) that reopens deaf streams; `light()` says the consumer holds
    little enough that every stream has room (a stream at its flow-control limit is quiet on
    purpose), `streams()` the streams now, `hand_back` nacks the probe's message."""

    def __init__(
        self,
        subscriber: pubsub_v1.SubscriberClient,
        subscription: str,
        light: Callable[[], bool],
        streams: Callable[[], Sequence[Watched]],
        hand_back: Callable[[list[str]], None],
    ) -> None:
        self._subscriber = subscriber
        self._subscription = subscription
        self._light, self._streams, self._hand_back = light, streams, hand_back
        self._stop = threading.Event()
        self._thread = supervised_thread(self._run, "stream-watch")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        # Not waiting out a probe under way (up to PROBE_SECONDS): a stop has a grace period
        # to keep, and a probe's message handed back too late only comes back with its lease.
        self._stop.set()
        self._thread.join(0.5)

    def alive(self) -> bool:
        return self._stop.is_set() or self._thread.is_alive()

    def check(self) -> list[Watched]:
        """One look: the streams found deaf, already closed to reopen."""
        now = time.monotonic()
        quiet = [s for s in self._streams() if s.open and now - s.heard_at >= SILENT_SECONDS]
        if not quiet or not self._light() or not self._messages_ready():
            return []
        for stream in quiet:
            stream.recycle("silent")
        silent = round(now - min(s.heard_at for s in quiet))
        _log.warning("streams_deaf", streams=len(quiet), silent_s=silent)
        return quiet

    def _messages_ready(self) -> bool:
        try:
            response = self._subscriber.pull(
                request={"subscription": self._subscription, "max_messages": 1},
                timeout=PROBE_SECONDS,
                retry=None,
            )
        except google_exceptions.DeadlineExceeded:
            return False  # nothing ready (the service holds an idle pull to its deadline)
        except google_exceptions.GoogleAPIError as exc:
            _log.info("stream_probe_failed", error=excerpt(first_line(exc)))
            return False
        ack_ids = [item.ack_id for item in response.received_messages]
        if ack_ids:
            self._hand_back(ack_ids)
        return bool(ack_ids)

    def _run(self) -> None:
        while not self._stop.wait(CHECK_SECONDS):
            self.check()
