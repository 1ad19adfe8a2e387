"""The batcher: a batch is handed to the writer when it is full or its oldest message has
waited BATCH_MAX_WAIT_MS, including the first message after an idle spell."""

from __future__ import annotations

import threading
import time

from processor.pipeline.batcher import Batcher
from processor.pipeline.messages import Held, Received
from processor.schema import Observation


def held(n: int) -> list[Held]:
    observation = Observation("192.0.2.1", 443, "HTTP", 1, "hello world")
    return [Held(Received(str(i), str(i), b"", {}, 0.0), observation) for i in range(n)]


def test_the_first_message_after_an_idle_spell_waits_max_wait_not_the_writers_idle_period():
    # Given a writer idle on an empty batcher (flushing after 20 ms)
    batcher = Batcher(size=500, max_wait=0.02)
    taken: list[float] = []
    writer = threading.Thread(target=lambda: taken.append(len(batcher.take(timeout=30))))
    writer.start()
    time.sleep(0.2)  # pacing: the writer is asleep before the message comes
    # When one message arrives
    added_at = time.monotonic()
    batcher.add_many(held(1))
    writer.join(timeout=30)
    # Then the writer has it within a small multiple of max_wait, not after its 30 s timeout
    assert taken == [1]
    assert time.monotonic() - added_at < 5


def test_a_full_batch_is_taken_at_once_and_the_rest_waits_its_turn():
    batcher = Batcher(size=10, max_wait=60)
    batcher.add_many(held(25))
    assert len(batcher.take(timeout=1)) == 10
    assert len(batcher.take(timeout=1)) == 10
    assert batcher.take(timeout=0.05) == []  # 5 left: neither full nor old enough
    assert len(batcher) == 5


def test_oldest_age_follows_the_messages_still_waiting():
    batcher = Batcher(size=10, max_wait=60)
    assert batcher.oldest_age() == 0.0
    batcher.add_many(held(10))
    time.sleep(0.3)  # pacing: the first ten age
    five_added = time.monotonic()
    batcher.add_many(held(5))
    assert batcher.oldest_age() >= 0.3
    batcher.take(timeout=1)  # the first ten leave
    # The five's age, not the ten's: no wall-clock bound a busy machine could overrun.
    assert batcher.oldest_age() <= time.monotonic() - five_added


def test_after_close_nothing_is_taken_in_and_what_is_held_can_still_be_taken():
    batcher = Batcher(size=10, max_wait=60)
    batcher.add_many(held(3))
    batcher.close()
    assert batcher.add_many(held(1)) is False
    assert len(batcher.take(timeout=1)) == 3
    assert batcher.take(timeout=1) == []
