"""The broker: topics, subscriptions, publishing and dead-lettering. No gRPC in here.

One broker lock guards the registry and orders publishes; each subscription has its own lock for
delivery. Lock order is always broker, then subscription.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import structlog

from emulator import _pb, config, limits, names
from emulator.clock import Clock
from emulator.errors import AlreadyExists, NotFound
from emulator.model import Entry, StoredMessage
from emulator.subscription import SubscriptionState

_log = structlog.get_logger(__name__)

DEFAULT_PAGE_SIZE = 1000
_RETENTION_SWEEP_SECONDS = 60.0


class _Topic:
    def __init__(self, pb: Any) -> None:
        self.pb = pb
        self.subscriptions: set[str] = set()


class _Subscription:
    def __init__(self, pb: Any, state: SubscriptionState) -> None:
        self.pb = pb
        self.state = state


def _page(names_sorted: list[str], page_size: int, token: str) -> tuple[list[str], str]:
    """One page of sorted names after `token`; the token is the last name already returned."""
    size = page_size if page_size > 0 else DEFAULT_PAGE_SIZE
    rest = [n for n in names_sorted if n > token] if token else names_sorted
    page = rest[:size]
    return page, (page[-1] if len(rest) > size else "")


def _copy(pb: Any) -> Any:
    out = type(pb)()
    out.CopyFrom(pb)
    return out


class Broker:
    """Thread-safe in-memory Pub/Sub state; call `start()` before use and `stop()` after."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._topics: dict[str, _Topic] = {}
        self._subs: dict[str, _Subscription] = {}
        self._message_ids = itertools.count(1)
        self.clock = Clock()
        # Once set, new StreamingPulls are refused so clients cannot reconnect during shutdown.
        self.shutting_down = False

    def start(self) -> None:
        self.clock.start()
        self.clock.call_every(_RETENTION_SWEEP_SECONDS, self._purge_expired)

    def begin_shutdown(self) -> None:
        self.shutting_down = True
        self.close_all_streams("UNAVAILABLE", "The emulator is shutting down.")

    def stop(self) -> None:
        self.begin_shutdown()
        self.clock.stop()

    # -- topics ----------------------------------------------------------------------------

    def create_topic(self, topic: Any) -> Any:
        pb = config.normalize_topic(topic)
        with self._lock:
            if pb.name in self._topics:
                raise AlreadyExists(f"Resource already exists in the project (resource={pb.name}).")
            self._topics[pb.name] = _Topic(pb)
            return _copy(pb)

    def get_topic(self, name: str) -> Any:
        with self._lock:
            return _copy(self._topic(name).pb)

    def update_topic(self, topic: Any, paths: list[str]) -> Any:
        config.check_update_mask(paths, config.UPDATABLE_TOPIC_FIELDS)
        with self._lock:
            current = self._topic(topic.name)
            updated = _copy(current.pb)
            for path in paths:
                updated.ClearField(path)
                if path == "labels":
                    updated.labels.update(topic.labels)
                elif topic.HasField(path):
                    getattr(updated, path).CopyFrom(getattr(topic, path))
            current.pb = config.normalize_topic(updated)
            return _copy(current.pb)

    def delete_topic(self, name: str) -> None:
        with self._lock:
            topic = self._topic(name)
            for sub_name in topic.subscriptions:
                self._subs[sub_name].pb.topic = names.DELETED_TOPIC
            del self._topics[name]

    def list_topics(self, project: str, page_size: int, token: str) -> tuple[list[Any], str]:
        prefix = f"projects/{names.project(project)}/topics/"
        with self._lock:
            found = sorted(n for n in self._topics if n.startswith(prefix))
            page, next_token = _page(found, page_size, token)
            return [_copy(self._topics[n].pb) for n in page], next_token

    def list_topic_subscriptions(
        self, topic: str, page_size: int, token: str
    ) -> tuple[list[str], str]:
        with self._lock:
            return _page(sorted(self._topic(topic).subscriptions), page_size, token)

    def _topic(self, name: str) -> _Topic:
        names.topic(name)
        topic = self._topics.get(name)
        if topic is None:
            raise NotFound(f"Resource not found (resource={name}).")
        return topic

    # -- publishing ------------------------------------------------------------------------

    def publish(self, topic: str, messages: list[Any], nbytes: int | None = None) -> list[str]:
        """Store the messages and fan them out; returns their ids, in order.

        `nbytes` is the request's serialized size, computed here when the caller has none.
        """
        limits.check_publish(
            messages, limits.request_bytes(topic, messages) if nbytes is None else nbytes
        )
        now_ns = time.time_ns()
        with self._lock:
            target = self._topic(topic)
            stored = [self._stamp(m, now_ns) for m in messages]
            for sub_name in target.subscriptions:
                self._subs[sub_name].state.enqueue(stored)
        return [s.pb.message_id for s in stored]

    def _stamp(self, message: Any, now_ns: int) -> StoredMessage:
        pb = _copy(message)
        pb.message_id = str(next(self._message_ids))
        pb.publish_time.seconds, pb.publish_time.nanos = divmod(now_ns, 1_000_000_000)
        return StoredMessage(pb, pb.ByteSize(), now_ns / 1e9, pb.ordering_key)

    def _dead_letter(self, state: SubscriptionState, entries: list[Entry]) -> None:
        """Forward exhausted messages with the attributes the real service adds."""
        with self._lock:
            sub = self._subs.get(state.name)
            if sub is None:
                return
            dlq_topic = sub.pb.dead_letter_policy.dead_letter_topic
        project, sub_id = names.parse(state.name, "subscriptions")
        forwarded = []
        for e in entries:
            original = e.msg.pb
            msg = _pb.PubsubMessage(data=original.data, ordering_key=original.ordering_key)
            msg.attributes.update(original.attributes)
            msg.attributes.update(
                {
                    "CloudPubSubDeadLetterSourceDeliveryCount": str(e.attempts),
                    "CloudPubSubDeadLetterSourceSubscription": sub_id,
                    "CloudPubSubDeadLetterSourceSubscriptionProject": project,
                    "CloudPubSubDeadLetterSourceTopicPublishTime": _rfc3339_millis(original),
                }
            )
            forwarded.append(msg)
        try:
            self.publish(dlq_topic, forwarded)
        except NotFound:
            _log.warning("dead_letter_topic_missing", topic=dlq_topic, dropped=len(entries))

    # -- subscriptions ---------------------------------------------------------------------

    def create_subscription(self, sub: Any) -> Any:
        pb = config.normalize_subscription(sub)
        with self._lock:
            if pb.name in self._subs:
                raise AlreadyExists(f"Resource already exists in the project (resource={pb.name}).")
            topic = self._topic(pb.topic)
            if pb.HasField("dead_letter_policy"):
                self._topic(pb.dead_letter_policy.dead_letter_topic)
            policy = config.delivery_policy(pb)
            state = SubscriptionState(pb.name, policy, self.clock, self._dead_letter)
            self._subs[pb.name] = _Subscription(pb, state)
            topic.subscriptions.add(pb.name)
            return _copy(pb)

    def get_subscription(self, name: str) -> Any:
        with self._lock:
            return _copy(self._sub(name).pb)

    def update_subscription(self, sub: Any, paths: list[str]) -> Any:
        config.check_update_mask(paths, config.UPDATABLE_SUBSCRIPTION_FIELDS)
        with self._lock:
            current = self._sub(sub.name)
            updated = _copy(current.pb)
            for path in paths:
                updated.ClearField(path)
                if path == "labels":
                    updated.labels.update(sub.labels)
                elif path in ("ack_deadline_seconds", "retain_acked_messages"):
                    setattr(updated, path, getattr(sub, path))
                elif sub.HasField(path):
                    getattr(updated, path).CopyFrom(getattr(sub, path))
            normalized = config.normalize_subscription(
                updated, check_topic=updated.topic != names.DELETED_TOPIC
            )
            if normalized.HasField("dead_letter_policy"):
                self._topic(normalized.dead_letter_policy.dead_letter_topic)
            current.pb = normalized
            current.state.policy = config.delivery_policy(normalized)
            return _copy(normalized)

    def delete_subscription(self, name: str) -> None:
        with self._lock:
            sub = self._sub(name)
            del self._subs[name]
            topic = self._topics.get(sub.pb.topic)
            if topic is not None:
                topic.subscriptions.discard(name)
        sub.state.delete()

    def list_subscriptions(self, project: str, page_size: int, token: str) -> tuple[list[Any], str]:
        prefix = f"projects/{names.project(project)}/subscriptions/"
        with self._lock:
            found = sorted(n for n in self._subs if n.startswith(prefix))
            page, next_token = _page(found, page_size, token)
            return [_copy(self._subs[n].pb) for n in page], next_token

    def subscription(self, name: str) -> SubscriptionState:
        """The delivery state of a subscription, for Pull, acks and streams."""
        with self._lock:
            return self._sub(name).state

    def message_ordering(self, name: str) -> bool:
        with self._lock:
            return self._sub(name).pb.enable_message_ordering

    def _sub(self, name: str) -> _Subscription:
        names.subscription(name)
        sub = self._subs.get(name)
        if sub is None:
            raise NotFound(f"Resource not found (resource={name}).")
        return sub

    # -- housekeeping ----------------------------------------------------------------------

    def close_all_streams(self, code: str, reason: str) -> None:
        with self._lock:
            states = [s.state for s in self._subs.values()]
        for state in states:
            state.close_all_streams(code, reason)

    def _purge_expired(self) -> None:
        with self._lock:
            states = [s.state for s in self._subs.values()]
        for state in states:
            state.purge_expired()


def _rfc3339_millis(msg: Any) -> str:
    t = msg.publish_time
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t.seconds))
    return f"{stamp}.{t.nanos // 1_000_000:03d}+00:00"
