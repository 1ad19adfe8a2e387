"""The table as docs/capacity.md advises past 100-200 M rows: hash partitions on the key, made
by deploy/postgres/partition-services.sql from a populated table, with the processor unchanged."""

from __future__ import annotations

import random

import pytest

from emulator.testing import wait_until
from processor.schema import Observation
from processor.storage import Repository, UpsertResult, migrate, open_engine
from processor.tests.helpers import ROOT
from processor.tests.helpers.oracle import expected_rows, stored_rows
from processor.tests.helpers.pipeline import observations, publish_observations

SCRIPT = ROOT / "deploy" / "postgres" / "partition-services.sql"


def partitions(connection) -> dict[str, list[str] | None]:
    """Each partition of `services` and its storage options."""
    return dict(
        connection.exec_driver_sql(
            "SELECT c.relname, c.reloptions FROM pg_inherits i JOIN pg_class c"
            " ON c.oid = i.inhrelid WHERE i.inhparent = 'services'::regclass"
        ).all()
    )


@pytest.mark.parametrize("consumer", ["batch"])
def test_a_populated_table_partitioned_by_the_script_keeps_its_rows_and_the_merge_rule(
    emulator_host, make_pipeline, postgres_url
):
    # Given a migrated table holding 3,000 rows
    engine = open_engine(postgres_url)
    migrate(engine)
    repository = Repository(engine)
    stored = [
        Observation(f"10.1.{i // 256}.{i % 256}", 443, "HTTP", 1_700_000_000 + i, f"r{i}")
        for i in range(3000)
    ]
    repository.upsert_many(stored)

    # When the operator runs the partitioning script
    with engine.begin() as connection:
        connection.exec_driver_sql(SCRIPT.read_text())

    # Then the table is 16 hash partitions, each with the fillfactor, the rows spread over all
    with engine.connect() as connection:
        strategy = connection.exec_driver_sql(
            "SELECT partstrat FROM pg_partitioned_table WHERE partrelid = 'services'::regclass"
        ).scalar()
        made = partitions(connection)
        counts = connection.exec_driver_sql(
            "SELECT tableoid::regclass::text, count(*) FROM services GROUP BY 1"
        ).all()
    assert strategy == "h"
    assert len(made) == 16
    assert set(map(tuple, made.values())) == {("fillfactor=90",)}
    assert len(counts) == 16
    assert min(count for _, count in counts) > 0
    assert stored_rows(repository.rows()) == expected_rows(stored)

    # And the revision is still the head (migrating again changes nothing)
    migrate(engine)
    assert len(partitions(engine.connect())) == 16

    # And the merge rule and its counts hold: newer wins, older only moves first_seen, a new
    # key is counted as inserted, a replay changes nothing
    newer = stored[0]._replace(timestamp=1_800_000_000, response="newer")
    older = stored[1]._replace(timestamp=1_600_000_000, response="older")
    fresh = Observation("10.2.0.1", 22, "SSH", 1_700_000_000, "fresh")
    assert repository.upsert_many([newer, older, fresh]) == UpsertResult(1, 2, 0)
    assert repository.upsert_many([newer, older, fresh]) == UpsertResult(0, 0, 3)

    # And a processor drains duplicated, shuffled scans into it, ending at the oracle
    pipeline = make_pipeline(database_url=postgres_url)
    items = observations(2000, keys=250, seed=21)
    deliveries = items + random.Random(22).sample(items, 500)
    random.Random(23).shuffle(deliveries)
    stop = pipeline.start_processor()
    publish_observations(pipeline, deliveries)
    expected = expected_rows([*stored, newer, older, fresh, *items])
    assert wait_until(lambda: stored_rows(pipeline.rows()) == expected, timeout=30, interval=0.2)
    assert stop() == 0
    engine.dispose()
