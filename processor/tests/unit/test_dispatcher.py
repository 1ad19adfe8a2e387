"""The dispatcher: extensions never wait behind acks, every request has a deadline shorter than
a lease, requests stay within Pub/Sub's limits, and a dead sender thread is noticed."""

from __future__ import annotations

import pytest
from google.api_core import exceptions as google_exceptions

from emulator.testing import wait_until
from processor.pipeline.dispatcher import Dispatcher
from processor.runtime.metrics import Metrics
from processor.runtime.pubsub import MAX_IDS_PER_REQUEST
from processor.tests.helpers.fakes import RecordingSubscriber

LEASE = 20


def dispatcher(subscriber: RecordingSubscriber, **callbacks) -> Dispatcher:
    sender = Dispatcher(subscriber, "projects/p/subscriptions/s", LEASE, Metrics(), **callbacks)
    sender.start()
    return sender


def test_an_extension_is_sent_while_an_ack_request_hangs() -> None:
    """Catches extensions sent from the ack thread (they would wait for the hung ack)."""
    # Given an ack request the service does not answer
    subscriber = RecordingSubscriber()
    subscriber.block("ack")
    sender = dispatcher(subscriber)
    sender.ack(["committed-1"])
    assert subscriber.entered["ack"].wait(5)
    # When the held messages' leases are due for an extension
    sender.extend(["held-1", "held-2"])
    # Then the extension is sent at once, for the lease, while the ack still hangs
    assert wait_until(lambda: subscriber.sent("modack") == [["held-1", "held-2"]], timeout=5)
    assert subscriber.sent("ack") == []
    assert subscriber.calls[0][2] == LEASE
    subscriber.release("ack")
    sender.close(5)
    assert subscriber.sent("ack") == [["committed-1"]]


def test_every_request_has_a_deadline_shorter_than_a_lease_retries_included() -> None:
    """Catches a request sent with the library's defaults (60 s, past any lease)."""
    subscriber = RecordingSubscriber()
    sender = dispatcher(subscriber)
    sender.ack(["a"])
    sender.nack(["b"])
    sender.extend(["c"])
    assert wait_until(lambda: len(subscriber.calls) == 3, timeout=5)
    sender.close(5)
    for kind, _, _, timeout, retry_timeout in subscriber.calls:
        assert timeout is not None, kind
        assert timeout < LEASE, kind
        assert retry_timeout is not None, kind
        assert retry_timeout < LEASE, kind


def test_a_newer_extension_replaces_one_not_yet_sent() -> None:
    # Given an extension under way that the service is slow to answer
    subscriber = RecordingSubscriber()
    subscriber.block("modack")
    sender = dispatcher(subscriber)
    sender.extend(["first"])
    assert subscriber.entered["modack"].wait(5)
    # When two more are scheduled before it returns
    sender.extend(["second"])
    sender.extend(["third"])
    subscriber.release("modack")
    # Then only the newest is sent after it: what is held now, not a queue of stale sets
    assert wait_until(lambda: len(subscriber.sent("modack")) == 2, timeout=5)
    sender.close(5)
    assert subscriber.sent("modack") == [["first"], ["third"]]


def test_acks_and_nacks_leave_in_order_within_the_id_limit() -> None:
    subscriber = RecordingSubscriber()
    sender = dispatcher(subscriber)
    ids = [f"id-{i}" for i in range(MAX_IDS_PER_REQUEST + 10)]
    sender.ack(ids)
    sender.nack(["back"])
    sender.close(5)
    assert [ack_id for chunk in subscriber.sent("ack") for ack_id in chunk] == ids
    assert max(map(len, subscriber.sent("ack"))) <= MAX_IDS_PER_REQUEST
    nacks = [call for call in subscriber.calls if call[0] == "modack"]
    assert nacks == [("modack", ["back"], 0, nacks[0][3], nacks[0][4])]


def test_a_request_left_unanswered_is_reported_and_counted() -> None:
    """Catches timeouts that go unnoticed (the streams' watch marks the connection suspect)."""
    subscriber = RecordingSubscriber()
    subscriber.fail_with = google_exceptions.DeadlineExceeded("no answer")
    timeouts: list[bool] = []
    metrics = Metrics()
    sender = Dispatcher(
        subscriber, "projects/p/subscriptions/s", LEASE, metrics, lambda: timeouts.append(True)
    )
    sender.start()
    sender.extend(["held"])
    assert wait_until(lambda: timeouts == [True], timeout=5)
    sender.close(5)
    assert metrics.lease_requests_failed.labels(request="extend")._value.get() == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_sender_thread_killed_by_a_bug_is_not_alive() -> None:
    """Catches `alive()` that only checks a flag (a dead ack thread must fail /healthz)."""
    subscriber = RecordingSubscriber()
    subscriber.fail_with = RuntimeError("a bug in the ack path")
    sender = dispatcher(subscriber)
    assert sender.alive()
    sender.ack(["a"])
    assert wait_until(lambda: not sender.alive(), timeout=5)
