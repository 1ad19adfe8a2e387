"""The leases: what is held is extended on schedule and never after it was settled, the
flow-control gate holds a stream back until there is room, and closing hands back the rest."""

from __future__ import annotations

import threading

import pytest

from emulator.testing import wait_until
from processor.pipeline.leases import Leases
from processor.pipeline.messages import Received
from processor.tests.helpers.fakes import RecordingDispatcher


def received(ack_id: str, size: int = 10) -> Received:
    return Received(ack_id, ack_id, b"x" * size, {}, 0.0)


def leases(dispatcher: RecordingDispatcher, lease_seconds: float = 0.3, **kw) -> Leases:
    limits = {"max_messages": 1000, "max_bytes": 1_000_000} | kw
    held = Leases(dispatcher, lease_seconds, keepalive=lambda: None, **limits)
    held.start()
    return held


def test_held_messages_are_extended_on_schedule_and_never_after_their_ack() -> None:
    # Given three messages held, with a lease of 0.3 s (extended every 0.1 s)
    dispatcher = RecordingDispatcher()
    held = leases(dispatcher)
    held.add([received("a"), received("b"), received("c")])
    assert wait_until(lambda: ["a", "b", "c"] in dispatcher.extensions, timeout=5)
    # When one is acked and one handed back
    held.ack([received("a")])
    held.nack([received("b")])
    count = len(dispatcher.extensions)
    # Then the next extensions name only the one still held
    assert wait_until(lambda: len(dispatcher.extensions) >= count + 2, timeout=5)
    assert dispatcher.extensions[-1] == ["c"]
    assert (dispatcher.acked, dispatcher.nacked) == (["a"], ["b"])
    held.close()


def test_a_stream_waits_for_room_and_reads_again_once_messages_are_released() -> None:
    # Given leases allowing 1 MB in all, holding one 300 kB message
    dispatcher = RecordingDispatcher()
    held = leases(dispatcher, max_bytes=1_000_000)
    message = received("big", 300_000)
    held.add([message])
    stop = threading.Event()
    held.wait_for_room(stop)  # room: returns at once
    # When its decoded form (say 1.2 MB: 4 bytes a character) is weighed
    held.weigh([(message, 1_200_000)])
    waiter = threading.Thread(target=held.wait_for_room, args=(stop,))
    waiter.start()
    waiter.join(timeout=1)
    # Then a stream waits for room, and reads again once the message is released
    assert waiter.is_alive()
    held.ack([message])
    waiter.join(timeout=5)
    assert not waiter.is_alive()
    held.close()


def test_closing_hands_back_what_is_held_and_stops_the_schedule() -> None:
    dispatcher = RecordingDispatcher()
    held = leases(dispatcher, lease_seconds=60)
    held.add([received("a"), received("b")])
    held.ack([received("a")])
    held.close()
    assert dispatcher.nacked == ["b"]
    assert len(held) == 0
    assert held.alive()  # closed on purpose is not dead


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_schedule_killed_by_a_bug_is_not_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches an `alive()` that ignores the lease thread (dead, nothing would be extended)."""

    def broken() -> None:
        raise RuntimeError("a bug in the keepalive")

    monkeypatch.setattr("processor.pipeline.leases.KEEPALIVE_SECONDS", 0.05)
    held = Leases(RecordingDispatcher(), 0.3, 1000, 1_000_000, keepalive=broken)
    held.start()
    assert wait_until(lambda: not held.alive(), timeout=5)
