"""Outages the processor must ride out without dead-lettering a valid message: one longer than
the maximum lease, a database that stops answering, and a table that refuses every row; and the
liveness (/healthz) of a writer that died or is stuck."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
import structlog

from emulator.testing import free_port, wait_until
from processor.schema import Observation
from processor.storage import Repository, migrate, open_engine
from processor.storage.repository import CANARY_IP
from processor.tests.helpers.chaos import allow, database_outage, refuse
from processor.tests.helpers.fakes import fresh_keys
from processor.tests.helpers.pipeline import (
    Pipeline,
    http_get,
    metric,
    observations,
    publish_observations,
    reaches_oracle,
)
from processor.tests.helpers.wire import scan

# Every test here injects faults into the session emulator; none may leak into another test.
pytestmark = pytest.mark.usefixtures("faults")

DATABASE_TIMEOUT = 2  # seconds, in the stall tests
# README: a call left unanswered is reported DATABASE_TIMEOUT + 1 s after it began (the watchdog
# looks four times a second). The test allows this much more for a busy machine.
DETECTION_SLACK = 4.0


def test_an_outage_longer_than_the_maximum_lease_dead_letters_nothing_and_holds_one_batch(
    emulator_host: str,
    make_pipeline: Callable[..., Pipeline],
    any_database_url: str,
) -> None:
    # Given a subscription that dead-letters after 5 deliveries, and a processor whose
    # messages may wait 2 s for their commit
    port = free_port()
    with database_outage(any_database_url) as (url, outage):
        pipeline = make_pipeline(
            database_url=url,
            setup={"max_delivery_attempts": 5},
            metrics_port=port,
            max_lease_seconds=2,
            lease_seconds=10,
            batch_size=50,
        )
        stop = pipeline.start_processor()
        first, second = observations(50, keys=50, seed=31), observations(600, keys=250, seed=32)
        publish_observations(pipeline, first)
        assert reaches_oracle(pipeline, first)
        # When the database is away for many times that, while 600 messages wait
        outage.begin()
        try:
            publish_observations(pipeline, second)
            assert wait_until(lambda: metric(port, "mini_scan_streams_paused") == 1, timeout=30)
            # Then it keeps only the batch it is retrying, and Pub/Sub keeps the rest: no
            # redelivery, so no delivery attempt is spent while the outage lasts
            received = metric(port, "mini_scan_messages_received_total")
            deadline = time.monotonic() + 12  # six maximum leases
            while time.monotonic() < deadline:  # an invariant held over time
                assert metric(port, "mini_scan_messages_held") <= 50
                assert metric(port, "mini_scan_messages_received_total") == received
                assert http_get(port, "/readyz")[0] == 503
                time.sleep(0.5)
        finally:
            outage.end()
        # And it resumes by itself, stores everything, and dead-letters nothing
        assert reaches_oracle(pipeline, first + second, timeout=60)
        assert wait_until(lambda: metric(port, "mini_scan_streams_paused") == 0, timeout=15)
        assert wait_until(lambda: http_get(port, "/readyz")[0] == 200, timeout=15)
        assert stop() == 0
    assert pipeline.dead_letters(expected=1, timeout=2) == []


# --- a database that stops answering -------------------------------------------------------


def test_a_database_that_stops_answering_is_an_outage_reported_within_the_timeout(
    emulator_host: str, make_pipeline: Callable[..., Pipeline], any_database_url: str
) -> None:
    # Given a processor whose database calls may go unanswered for 2 s
    port = free_port()
    with database_outage(any_database_url, stall=True) as (url, stall):
        pipeline = make_pipeline(
            database_url=url, metrics_port=port, database_timeout=DATABASE_TIMEOUT
        )
        first, second = observations(50, keys=50, seed=41), observations(300, keys=200, seed=42)
        with structlog.testing.capture_logs() as logs:
            stop = pipeline.start_processor()
            publish_observations(pipeline, first)
            assert reaches_oracle(pipeline, first)
            # When the database stops answering (PostgreSQL: no byte forwarded, no reset;
            # SQLite: another connection holds the write lock) while messages keep coming
            stall.begin()
            try:
                began = time.monotonic()
                publish_observations(pipeline, second)
                # Then within the stated bound the processor is not ready and says why
                bound = DATABASE_TIMEOUT + 1 + DETECTION_SLACK
                assert wait_until(lambda: http_get(port, "/readyz")[0] == 503, timeout=bound)
                detected = time.monotonic() - began
                assert detected <= bound, detected
                assert wait_until(lambda: _warned(logs, "database_unavailable"), timeout=5)
                assert metric(port, "mini_scan_database_up") == 0
                # and it retries, alive, holding its messages
                assert wait_until(
                    lambda: metric(port, "mini_scan_storage_retries_total") >= 1, timeout=20
                )
                assert http_get(port, "/healthz")[0] == 200
                if not url.startswith("sqlite"):  # SQLite's busy timeout answers first
                    assert metric(port, "mini_scan_database_timeouts_total") >= 1
            finally:
                stall.end()
            # And once the database answers again everything is stored, nothing dead-lettered
            recovers_losing_nothing(pipeline, port, first + second, stop)
    print(f"stalled database reported (/readyz 503) after {detected:.2f} s")


def test_a_writer_stuck_in_a_call_fails_healthz_until_it_moves_again(
    emulator_host: str, make_pipeline: Callable[..., Pipeline], postgres_url: str
) -> None:
    # Given a database timeout far longer than the writer may go without progress
    port = free_port()
    with database_outage(postgres_url, stall=True) as (url, stall):
        pipeline = make_pipeline(
            database_url=url, metrics_port=port, database_timeout=600, writer_stall_seconds=2
        )
        stop = pipeline.start_processor()
        first, second = observations(50, keys=50, seed=43), observations(100, keys=100, seed=44)
        publish_observations(pipeline, first)
        assert reaches_oracle(pipeline, first)
        assert http_get(port, "/healthz")[0] == 200
        # When a commit hangs, with messages waiting, and no timeout ends it
        stall.begin()
        try:
            publish_observations(pipeline, second)
            # Then /healthz fails: the process is stuck, and a restart is the way out
            assert wait_until(lambda: http_get(port, "/healthz")[0] == 503, timeout=20)
        finally:
            stall.end()
        # And once the call returns, the writer moves on and /healthz recovers
        assert wait_until(lambda: http_get(port, "/healthz")[0] == 200, timeout=20)
        assert reaches_oracle(pipeline, first + second)
        assert stop() == 0
    assert pipeline.dead_letters(expected=1, timeout=1) == []


# --- a table that refuses every row -----------------------------------------------------------


def test_a_table_that_refuses_every_row_is_an_outage_and_dead_letters_nothing(
    emulator_host: str, make_pipeline: Callable[..., Pipeline], any_database_url: str
) -> None:
    port = free_port()
    pipeline = make_pipeline(database_url=any_database_url, metrics_port=port)
    first, second = fresh_keys(50), fresh_keys(300, start=50)
    with structlog.testing.capture_logs() as logs:
        stop = pipeline.start_processor()
        publish_observations(pipeline, first)
        assert reaches_oracle(pipeline, first)
        # When a constraint that no row meets is added under the running processor
        refuse(any_database_url, "refuse_all", "port", ">= 0")
        publish_observations(pipeline, second)
        # Then it is an outage of the table: not ready, counted, logged with the cause, retried
        table = 'mini_scan_storage_refusals_total{cause="table"}'
        assert wait_until(lambda: metric(port, table) >= 3, timeout=30)
        assert http_get(port, "/readyz")[0] == 503
        assert metric(port, 'mini_scan_storage_refusals_total{cause="row"}') == 0
        assert _warned(logs, "storage_refused"), [e["event"] for e in logs]
        warnings = [e for e in logs if e["event"] == "storage_refused"]
        assert warnings[0]["cause"] == "table"
        assert "refuse_all" in warnings[0]["error"]
        # and nothing is dead-lettered
        assert pipeline.dead_letters(expected=1, timeout=2) == []
        # And once the constraint is gone, everything is stored
        allow(any_database_url, "refuse_all")
        recovers_losing_nothing(pipeline, port, first + second, stop)


def test_one_row_the_table_refuses_among_good_ones_is_dead_lettered_alone(
    emulator_host: str, make_pipeline: Callable[..., Pipeline], any_database_url: str
) -> None:
    # Given a constraint only one message of a batch breaks (the canary meets it)
    engine = open_engine(any_database_url)
    migrate(engine)
    engine.dispose()
    refuse(any_database_url, "no_poison", "response", "= 'poison'")
    port = free_port()
    pipeline = make_pipeline(
        database_url=any_database_url, metrics_port=port, batch_max_wait_ms=500
    )
    good = fresh_keys(40)
    publish_observations(pipeline, good[:20])
    pipeline.publish([scan("9.9.9.9", 1, "HTTP", int(time.time()), "poison")], case="poison")
    publish_observations(pipeline, good[20:])
    # When the processor stores the batch
    stop = pipeline.start_processor()
    # Then only that message is dead-lettered, as storage_rejected, and the rest is stored
    letters = pipeline.dead_letters(expected=1)
    assert [(m.attributes.get("case"), m.attributes["reason"]) for m in letters] == [
        ("poison", "storage_rejected")
    ]
    assert "no_poison" in letters[0].attributes["error"]
    assert reaches_oracle(pipeline, good)
    assert metric(port, 'mini_scan_storage_refusals_total{cause="row"}') >= 1
    assert metric(port, 'mini_scan_storage_refusals_total{cause="table"}') == 0
    assert stop() == 0
    assert pipeline.dead_letters(expected=1, timeout=1) == []


def test_the_canary_is_never_committed(migrated_url: str) -> None:
    repository = Repository(open_engine(migrated_url))
    try:
        assert repository.accepts_a_known_good_row()
        refuse(migrated_url, "refuse_all", "port", ">= 0")
        assert not repository.accepts_a_known_good_row()
        allow(migrated_url, "refuse_all")
        assert repository.accepts_a_known_good_row()
        with repository.engine.connect() as connection:
            table = sa.table("services", sa.column("ip"))
            count = sa.select(sa.func.count()).select_from(table).where(table.c.ip == CANARY_IP)
            assert connection.execute(count).scalar() == 0
    finally:
        repository.engine.dispose()


def recovers_losing_nothing(
    pipeline: Pipeline, port: int, published: list[Observation], stop: Callable[[], int]
) -> None:
    """After an outage: everything published stored, ready again, a clean stop, and nothing
    dead-lettered."""
    assert reaches_oracle(pipeline, published, timeout=60)
    assert wait_until(lambda: http_get(port, "/readyz")[0] == 200, timeout=15)
    assert stop() == 0
    assert pipeline.dead_letters(expected=1, timeout=2) == []


def _warned(logs: list[dict[str, Any]], event: str) -> bool:
    return any(e["event"] == event and e["log_level"] == "warning" for e in list(logs))
