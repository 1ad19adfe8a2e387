"""The writer on its own: liveness when its thread dies or stalls, refusals sorted out from
outages (rows from the table), with in-memory fakes of the processor's side and real databases."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest

from emulator.testing import wait_until
from processor.pipeline.batcher import Batcher
from processor.pipeline.writer import Writer
from processor.runtime.health import HealthServer
from processor.runtime.metrics import Metrics
from processor.storage import Repository, open_engine
from processor.tests.helpers.chaos import allow, refuse
from processor.tests.helpers.fakes import MemoryRepository, RecordedOutcomes, fresh_keys, held
from processor.tests.helpers.pipeline import http_get


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
    outcomes = RecordedOutcomes(broken=True)
    repository = MemoryRepository()
    writer = Writer(batcher, repository, outcomes, Metrics(), stall_seconds=0.3).start()
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
    batcher, outcomes, metrics = Batcher(500, 0.01), RecordedOutcomes(), Metrics()
    repository = Repository(open_engine(migrated_url))
    writer = Writer(batcher, repository, outcomes, metrics, max_backoff=0.2).start()
    try:
        # When the writer stores it
        batcher.add_many(batch)

        def refusals() -> float:
            sample = "mini_scan_storage_refusals_total"
            return metrics.registry.get_sample_value(sample, {"cause": cause}) or 0

        assert wait_until(lambda: refusals() >= 1, timeout=20)
        if cause == "row":
            # Then the bad rows are dead-lettered and the good ones acked
            assert wait_until(lambda: len(outcomes.acked) == rows - bad, timeout=10)
            assert sorted(m.ack_id for m, _ in outcomes.refused) == sorted(
                h.received.ack_id for h in batch if h.observation.response == "bad"
            )
            assert len(repository.rows()) == rows - bad
            return
        # Then nothing is dead-lettered or acked while the table refuses, and it is an outage
        assert wait_until(lambda: refusals() >= 3, timeout=20)
        assert not writer.database_up
        assert outcomes.refused == []
        assert outcomes.acked == []
        # And once the constraint is gone the whole batch is stored
        allow(migrated_url, "no_bad")
        assert wait_until(lambda: len(outcomes.acked) == rows, timeout=20)
        assert len(repository.rows()) == rows
        assert outcomes.refused == []
    finally:
        batcher.close()
        writer.join(10)
        repository.engine.dispose()
