"""Outages the processor must ride out without dead-lettering a valid message: one longer than
the maximum lease, a database that stops answering, and a table that refuses every row; and the
liveness (/healthz) of a writer that died or is stuck."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import pytest
import sqlalchemy as sa
import structlog

from emulator import Emulator
from emulator.testing import free_port, wait_until
from processor.pipeline.batcher import Batcher
from processor.pipeline.messages import Held, Received
from processor.pipeline.writer import Writer
from processor.runtime.health import HealthServer
from processor.runtime.metrics import Metrics
from processor.schema import Observation
from processor.storage import Repository, UpsertResult, migrate, open_engine
from processor.storage.repository import CANARY_IP
from processor.tests.helpers.chaos import ProxyCut, SqliteWriteLock, database_address, proxied_url
from processor.tests.helpers.pipeline import (
    Pipeline,
    http_get,
    metric,
    observations,
    publish_observations,
    reaches_oracle,
    scan,
)
from processor.tests.helpers.tcpproxy import tcp_proxy

DATABASE_TIMEOUT = 2  # seconds, in the stall tests
# README: a call left unanswered is reported DATABASE_TIMEOUT + 1 s after it began (the watchdog
# looks four times a second). The test allows this much more for a busy machine.
DETECTION_SLACK = 4.0


class ProxyStall(ProxyCut):
    """Makes a database stop answering: connections through the proxy stay open, but no byte
    is forwarded (a network that silently drops packets, a frozen server)."""

    def begin(self) -> None:
        self._proxy.stall()


@contextlib.contextmanager
def outage_of(url: str, stall: bool = False) -> Iterator[tuple[str, ProxyCut | SqliteWriteLock]]:
    """A URL for the processor and a way to make that database unwritable: another connection
    holding SQLite's write lock (writes wait for it), or PostgreSQL's connections cut at a TCP
    proxy (or, with `stall`, left open with nothing forwarded)."""
    if url.startswith("sqlite"):
        lock = SqliteWriteLock(url.removeprefix("sqlite:///"))
        try:
            yield url, lock
        finally:
            lock.close()
        return
    with tcp_proxy(*database_address(url)) as proxy:
        yield proxied_url(url, proxy.address), (ProxyStall if stall else ProxyCut)(proxy)


def test_an_outage_longer_than_the_maximum_lease_dead_letters_nothing_and_holds_one_batch(
    emulator_host: str,
    make_pipeline: Callable[..., Pipeline],
    any_database_url: str,
) -> None:
    # Given a subscription that dead-letters after 5 deliveries, and a processor whose
    # messages may wait 2 s for their commit
    port = free_port()
    with outage_of(any_database_url) as (url, outage):
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
    with outage_of(any_database_url, stall=True) as (url, stall):
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
    with outage_of(postgres_url, stall=True) as (url, stall):
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


class DeadLetterCatcher:
    """Dead letters kept in memory: what the writer sent, and why."""

    def __init__(self) -> None:
        self.sent: list[tuple[Received, str, str]] = []

    def send(self, message: Received, reason: Any, error: str) -> None:
        self.sent.append((message, str(reason), error))


class Acks:
    """The messages the writer acked and handed back; `broken` makes both raise."""

    def __init__(self, broken: bool = False) -> None:
        self.acked: list[Received] = []
        self.nacked: list[Received] = []
        self._broken = broken

    def ack(self, messages: Sequence[Received]) -> None:
        if self._broken:
            raise RuntimeError("a bug in the ack path")
        self.acked += messages

    def nack(self, messages: Sequence[Received]) -> None:
        if self._broken:
            raise RuntimeError("a bug in the nack path")
        self.nacked += messages


class MemoryRepository(Repository):
    """The table as a dict (newest observation per key): no database at all."""

    def __init__(self) -> None:
        self.table: dict[tuple[str, int, str], Observation] = {}

    def upsert_many(self, observations: Iterable[Observation]) -> UpsertResult:
        for o in observations:
            self.table[o.key] = max(self.table.get(o.key, o), o, key=lambda x: x[3:])
        return UpsertResult(len(self.table), 0, 0)


def held(observations: Sequence[Observation]) -> list[Held]:
    return [
        Held(Received(f"ack-{i}", str(i), b"{}", {}, time.time()), o)
        for i, o in enumerate(observations)
    ]


@contextlib.contextmanager
def health_of(writer: Writer) -> Iterator[int]:
    """A health server for the writer's liveness; yields its port."""
    server = HealthServer("127.0.0.1", 0, Metrics(), lambda: True, writer.alive).start()
    try:
        yield server.port
    finally:
        server.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_writer_thread_that_dies_fails_healthz_and_an_idle_one_does_not() -> None:
    # Given a writer that may go 0.3 s without progress, idle for longer than that
    batcher = Batcher(size=10, max_wait=0.01)
    acks = Acks(broken=True)
    repository = MemoryRepository()
    writer = Writer(
        batcher, repository, DeadLetterCatcher(), acks, Metrics(), stall_seconds=0.3
    ).start()
    with health_of(writer) as port:
        time.sleep(1.0)  # idle for three stall periods: still alive
        assert http_get(port, "/healthz")[0] == 200
        # When a batch is committed, then hits a bug in its ack and another in its hand-back,
        # which ends the writer thread
        batcher.add_many(held(fresh_keys(3)))
        assert writer.join(10), "the writer thread should have died"
        assert len(repository.table) == 3
        # Then /healthz fails, and keeps failing
        for _ in range(3):
            assert http_get(port, "/healthz")[0] == 503


# --- a table that refuses every row -----------------------------------------------------------


def fresh_keys(count: int, start: int = 0) -> list[Observation]:
    """Observations of distinct, new keys."""
    now = int(time.time())
    return [
        Observation(f"10.9.{i // 250}.{i % 250}", 443, "HTTP", now - i, f"ok {i}")
        for i in range(start, start + count)
    ]


def refuse(url: str, name: str, column: str, test: str) -> None:
    """Make the table refuse rows whose `column` passes `test` (SQL), as a migration could: a
    CHECK constraint on PostgreSQL (not validated on the rows already stored), triggers raising
    ABORT on SQLite (an IntegrityError, as a CHECK gives; SQLite cannot add a CHECK)."""
    engine = open_engine(url)
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(
                f"ALTER TABLE services ADD CONSTRAINT {name} CHECK (NOT ({column} {test})) "
                "NOT VALID"
            )
        else:
            for event in ("INSERT", "UPDATE"):
                connection.exec_driver_sql(
                    f"CREATE TRIGGER {name}_{event.lower()} BEFORE {event} ON services "
                    f"WHEN NEW.{column} {test} "
                    f"BEGIN SELECT RAISE(ABORT, '{name} refuses the row'); END"
                )
    engine.dispose()


def allow(url: str, name: str) -> None:
    """Undo `refuse`."""
    engine = open_engine(url)
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"ALTER TABLE services DROP CONSTRAINT {name}")
        else:
            for event in ("insert", "update"):
                connection.exec_driver_sql(f"DROP TRIGGER {name}_{event}")
    engine.dispose()


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


@pytest.mark.parametrize(
    ("rows", "bad", "cause"),
    [(12, 7, "table"), (12, 6, "row"), (9, 9, "row")],
    ids=["most-of-12-is-the-table", "half-of-12-is-the-rows", "all-of-9-is-the-rows"],
)
def test_most_rows_of_a_batch_of_ten_or_more_refused_is_the_tables_fault(
    migrated_url: str, rows: int, bad: int, cause: str
) -> None:
    # Given a table whose new constraint the canary meets, and a batch with `bad` rows of
    # `rows` breaking it
    refuse(migrated_url, "no_bad", "response", "= 'bad'")
    batch = held(
        fresh_keys(rows - bad) + [o._replace(response="bad") for o in fresh_keys(bad, start=rows)]
    )
    batcher, acks, letters, metrics = Batcher(500, 0.01), Acks(), DeadLetterCatcher(), Metrics()
    repository = Repository(open_engine(migrated_url))
    writer = Writer(batcher, repository, letters, acks, metrics, max_backoff=0.2).start()
    try:
        # When the writer stores it
        batcher.add_many(batch)

        def refusals() -> float:
            sample = "mini_scan_storage_refusals_total"
            return metrics.registry.get_sample_value(sample, {"cause": cause}) or 0

        assert wait_until(lambda: refusals() >= 1, timeout=20)
        if cause == "row":
            # Then the bad rows are dead-lettered and the good ones acked
            assert wait_until(lambda: len(acks.acked) == rows - bad, timeout=10)
            assert sorted(m.ack_id for m, _, _ in letters.sent) == sorted(
                h.received.ack_id for h in batch if h.observation.response == "bad"
            )
            assert len(repository.rows()) == rows - bad
            return
        # Then nothing is dead-lettered or acked while the table refuses, and it is an outage
        assert wait_until(lambda: refusals() >= 3, timeout=20)
        assert not writer.database_up
        assert letters.sent == []
        assert acks.acked == []
        # And once the constraint is gone the whole batch is stored
        allow(migrated_url, "no_bad")
        assert wait_until(lambda: len(acks.acked) == rows, timeout=20)
        assert len(repository.rows()) == rows
        assert letters.sent == []
    finally:
        batcher.close()
        writer.join(10)
        repository.engine.dispose()


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


@pytest.fixture(autouse=True)
def _no_leaked_faults(our_emulator: Emulator) -> Iterator[None]:
    our_emulator.faults.clear()
    yield
    our_emulator.faults.clear()
