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

from emulator import config, limits, names
from emulator.clock import Clock
from emulator.deadletter import DeadLetterStats, dead_letter_copy
from emulator.errors import AlreadyExists, EmulatorError, InvalidArgument, NotFound
from emulator.model import Entry, StoredMessage
from emulator.subscription import SubscriptionState

_log = structlog.get_logger(__name__)

DEFAULT_PAGE_SIZE = 1000
_RETENTION_SWEEP_SECONDS = 60.0


class _Topic:
    def __init__(self, pb: Any) -> None:
        self.pb = pb
        self.subscriptions: set[str] = set()
        self.policy: Any | None = None  # IAM policy, gone with the topic


class _Subscription:
    def __init__(self, pb: Any, state: SubscriptionState) -> None:
        self.pb = pb
        self.state = state
        self.policy: Any | None = None


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
        self.dead_letters = DeadLetterStats(self.clock)
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

    def resource(self, name: str) -> _Topic | _Subscription:
        """The topic or subscription `name` names, for state that lives and dies with it."""
        parts = name.split("/")
        kind = parts[2] if len(parts) == 4 else ""
        with self._lock:
            if kind == "topics":
                return self._topic(name)
            if kind == "subscriptions":
                return self._sub(name)
        # Google's emulator's wording; the service's is not quoted anywhere we found.
        raise InvalidArgument(f"Invalid [topics, subscriptions] name: (name={name})")

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
        if nbytes is None:
            nbytes = limits.request_bytes(topic, messages)
        limits.check_publish(messages, nbytes)
        return self._fan_out(topic, messages)

    def _fan_out(self, topic: str, messages: list[Any]) -> list[str]:
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
        """Forward exhausted messages; any that cannot go stay on their subscription."""
        with self._lock:
            sub = self._subs.get(state.name)
            if sub is None or sub.state is not state:
                return  # the subscription was deleted, and its messages with it
            if not sub.pb.HasField("dead_letter_policy"):
                state.requeue(entries)  # the policy was removed meanwhile: deliver as usual
                return
            dlq_topic = sub.pb.dead_letter_policy.dead_letter_topic
        project, sub_id = names.parse(state.name, "subscriptions")
        fits: list[Entry] = []
        copies: list[Any] = []
        failed: list[Entry] = []
        error = ""
        for e in entries:
            copy = dead_letter_copy(e, project, sub_id)
            try:
                limits.check_publish([copy], limits.request_bytes(dlq_topic, [copy]))
            except EmulatorError as exc:
                failed.append(e)
                error = str(exc)
                continue
            fits.append(e)
            copies.append(copy)
        if fits:
            try:
                self._fan_out(dlq_topic, copies)  # each copy was checked as its own request
            except EmulatorError as exc:
                failed += fits
                fits, error = [], str(exc)
            else:
                state.forwarded(fits)
                self.dead_letters.record_forwarded(len(fits))
        if failed:
            state.requeue(failed)
            self.dead_letters.record_failure(state.name, dlq_topic, error, len(failed))

    def stats(self) -> dict[str, int]:
        """Counters for tests and operators (also served by the REST front at /emulator/stats)."""
        return {
            "dead_lettered": self.dead_letters.forwarded,
            "dead_letter_forward_failures": self.dead_letters.failures,
        }

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
