"""Dead-letter forwarding: the copy Pub/Sub publishes, and the record of forwards that failed.

The rule: a forward that fails (the copy breaks a publish limit, the topic is gone) never loses
the message. It stays on its subscription, deliverable as Pub/Sub leaves it (dead lettering is
"best effort" there), and the failure is counted and logged, one line a second at most.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import structlog

from emulator import _pb
from emulator.clock import Clock
from emulator.model import Entry

_log = structlog.get_logger(__name__)

LOG_INTERVAL_SECONDS = 1.0


def dead_letter_copy(e: Entry, project: str, subscription_id: str) -> Any:
    """The message as forwarded: the original with the attributes the real service adds."""
    original = e.msg.pb
    copy = _pb.PubsubMessage(data=original.data, ordering_key=original.ordering_key)
    copy.attributes.update(original.attributes)
    copy.attributes.update(
        {
            "CloudPubSubDeadLetterSourceDeliveryCount": str(e.attempts),
            "CloudPubSubDeadLetterSourceSubscription": subscription_id,
            "CloudPubSubDeadLetterSourceSubscriptionProject": project,
            "CloudPubSubDeadLetterSourceTopicPublishTime": _rfc3339_millis(original),
        }
    )
    return copy


def _rfc3339_millis(msg: Any) -> str:
    t = msg.publish_time
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t.seconds))
    return f"{stamp}.{t.nanos // 1_000_000:03d}+00:00"


class DeadLetterStats:
    """Counts forwards, and logs failed ones: the first at once, later ones summed per second."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.forwarded = 0
        self.failures = 0
        self._unlogged = 0
        self._last_line = -LOG_INTERVAL_SECONDS
        self._latest: dict[str, str] = {}
        self._flush_due = False

    def record_forwarded(self, n: int) -> None:
        with self._lock:
            self.forwarded += n

    def record_failure(self, subscription: str, topic: str, error: str, n: int) -> None:
        with self._lock:
            self.failures += n
            self._unlogged += n
            self._latest = {
                "subscription": subscription,
                "dead_letter_topic": topic,
                "error": error,
            }
            now = time.monotonic()
            if now - self._last_line < LOG_INTERVAL_SECONDS:
                if not self._flush_due:
                    self._flush_due = True
                    self._clock.call_at(self._last_line + LOG_INTERVAL_SECONDS, self._flush)
                return
            line = self._take_line(now)
        _log.warning("dead_letter_forward_failed", **line)

    def _flush(self) -> None:
        with self._lock:
            self._flush_due = False
            if not self._unlogged:
                return
            line = self._take_line(time.monotonic())
        _log.warning("dead_letter_forward_failed", **line)

    def _take_line(self, now: float) -> dict[str, Any]:
        """The next log line's fields: failures since the previous line, and the latest cause."""
        n, self._unlogged, self._last_line = self._unlogged, 0, now
        return {"messages": n, "total": self.failures, "kept_on_subscription": True, **self._latest}
