"""Chaos with an oracle: three processors under kill -9, database outages and Pub/Sub faults
(connections gone silent, deaf streams, acks held past a lease), then the table must equal the
merge rule applied to everything published, and every malformed message must be on the
dead-letter subscription with its reason (and nothing valid may be).

Replay a failure with the seed it prints:
`CHAOS_SEED=<seed> uv run pytest processor/tests/e2e/test_chaos.py`.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import time
from collections.abc import Callable

import pytest

from emulator import Emulator
from processor.tests.helpers.chaos import (
    ProxyCut,
    PubSubFaults,
    SqliteWriteLock,
    Workload,
    covers,
    database_outage,
    describe_difference,
    publish_paced,
    pull_dead_letters,
    reaches,
    repeated_letters,
    scan_workload,
    sent_twice_per_delivery,
    unexpected_letters,
)
from processor.tests.helpers.pipeline import Pipeline, ProcessorProcess
from processor.tests.helpers.tcpproxy import tcp_proxy
from scanner.malformed import MALFORMED_REASONS

MESSAGES = 20_000
KEYS = 300
PROCESSORS = 3
PUBLISH_SECONDS = 20  # the chaos lasts as long as the publishing
# A SIGKILLed processor's leases run out before its messages come back (the client's stream ack
# deadline, 10-60 s), and kills keep coming until publishing ends: a generous deadline.
CONVERGE_TIMEOUT = 150


@pytest.fixture
def seed() -> int:
    return int(os.environ.get("CHAOS_SEED") or random.randrange(2**32))


class Fleet:
    """The processors of one test: kill one at random, start another in its place."""

    def __init__(self, spawn: Callable[[], ProcessorProcess], rng: random.Random) -> None:
        self._spawn = spawn
        self._rng = rng
        self.running = [spawn() for _ in range(PROCESSORS)]
        self.killed = 0

    def kill_one(self) -> None:
        victim = self._rng.choice(self.running)
        victim.signal(signal.SIGKILL)
        assert victim.wait(timeout=10) == -signal.SIGKILL
        self.running.remove(victim)
        self.running.append(self._spawn())
        self.killed += 1

    def terminate_all(self) -> list[int]:
        for child in self.running:
            child.signal(signal.SIGTERM)
        return [child.wait(timeout=30) for child in self.running]


def unleash(
    rng: random.Random,
    fleet: Fleet,
    outage: SqliteWriteLock | ProxyCut,
    pubsub: PubSubFaults,
    until: Callable[[], bool],
) -> int:
    """Every 2-5 s kill a processor; every other time also take the database away for 1-4 s,
    the other times strike a Pub/Sub fault. Returns the number of database outages."""
    outages = 0
    for tick in itertools.count():
        if until():
            break
        time.sleep(rng.uniform(2.0, 5.0))  # pacing the schedule, not synchronisation
        fleet.kill_one()
        if tick % 2 == 0:
            pubsub.strike(rng)
        else:
            outage.begin()
            time.sleep(rng.uniform(1.0, 4.0))  # the outage itself
            outage.end()
            outages += 1
    return outages


@pytest.mark.slow
@pytest.mark.parametrize(
    "database", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_kill_9_and_database_outages_under_load_end_exactly_at_the_oracle(
    database: str,
    seed: int,
    request: pytest.FixtureRequest,
    our_emulator: Emulator,
    emulator_host: str,
    make_pipeline: Callable[..., Pipeline],
    spawn_processor: Callable[..., ProcessorProcess],
) -> None:
    replay = f"replay with CHAOS_SEED={seed}"
    print(replay)
    rng = random.Random(seed)
    direct_url = request.getfixturevalue(f"{database.replace('postgresql', 'postgres')}_url")
    # Given 20,000 scans of 300 keys (30% duplicates, timestamps shuffled, some a day old, 3%
    # malformed covering every rejection reason) published over half a minute
    workload: Workload = scan_workload(seed, MESSAGES, KEYS)
    host, port = our_emulator.address.rsplit(":", 1)
    with database_outage(direct_url) as (url, outage), tcp_proxy(host, int(port)) as proxy:
        pipeline = make_pipeline(database_url=url)
        pubsub = PubSubFaults(proxy, our_emulator.faults)
        fleet = Fleet(
            lambda: spawn_processor(pipeline, BATCH_SIZE="200", PUBSUB_EMULATOR_HOST=proxy.address),
            rng,
        )
        trace = our_emulator.broker.subscription(pipeline.settings.subscription_path).start_trace()
        publishing = publish_paced(
            pipeline.publisher, pipeline.settings.topic_path, workload, PUBLISH_SECONDS
        )
        # When a processor is killed with SIGKILL every few seconds and replaced, the database
        # is unavailable for seconds at a time, and Pub/Sub connections go silent, streams deaf
        # or acks slow, for as long as publishing lasts
        try:
            outages = unleash(rng, fleet, outage, pubsub, until=lambda: not publishing.is_alive())
        finally:
            publishing.join()
        print(f"{fleet.killed} processors killed, {outages} database outages, {pubsub.struck}")
        # Then the table equals the oracle exactly
        expected = workload.expected_rows()
        converging = time.monotonic()
        assert reaches(direct_url, expected, CONVERGE_TIMEOUT), (
            f"{describe_difference(direct_url, expected)}; {replay}"
        )
        print(f"converged {time.monotonic() - converging:.1f}s after publishing ended")
        # And every malformed message is dead-lettered with its reason, and nothing else is
        dead = workload.expected_dead_letters()
        assert len(dead) == len(workload.malformed)
        assert set(dead.values()) == {str(reason) for reason in MALFORMED_REASONS}
        # (a dead letter whose ack went into a silent connection comes back after keepalive
        # ends it and a lease runs out: up to 70 + 20 s, docs/reliability.md)
        letters = pull_dead_letters(
            pipeline.settings.dead_letter_subscription_path, covers(dead), timeout=120
        )
        assert unexpected_letters(letters, dead, repeats=True) == {}, replay
        # And a dead letter is repeated only when its message was delivered again (or its
        # Publish was retried after a silence)
        print(f"{repeated_letters(letters)} dead letters repeated")
        silences = pubsub.struck["silent_connections"]
        assert sent_twice_per_delivery(letters, trace.deliveries, silences) == {}, replay
        assert set(dead) <= {m.attributes["source_message_id"] for m in letters}, replay
        # And the processors still running stop cleanly on SIGTERM
        for child in fleet.running:
            child.wait_ready(timeout=60)
        assert fleet.terminate_all() == [0] * PROCESSORS, replay
