"""The repository: the merge rule on SQLite and PostgreSQL, alone and under concurrent writers."""

from __future__ import annotations

import multiprocessing
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processor.schema import Observation
from processor.storage import Repository, UpsertResult, behind, migrate, open_engine
from processor.storage.repository import merge
from processor.tests.helpers.oracle import expected_rows, stored_rows

KEYS = [("1.1.1.1", 80, "HTTP"), ("1.1.1.1", 22, "SSH"), ("2001:db8::1", 53, "DNS")]

observation = st.builds(
    lambda key, ts, response: Observation(*key, ts, response),
    st.sampled_from(KEYS),
    st.integers(min_value=1_700_000_000, max_value=1_700_000_005),  # few seconds: many ties
    st.sampled_from(["a", "b", "B", "é", "service response: 1", ""]),
)


@pytest.fixture
def repository(migrated_url: str) -> Repository:
    engine = open_engine(migrated_url)
    yield Repository(engine)
    engine.dispose()


def clear(repository: Repository) -> None:
    with repository.engine.begin() as connection:
        connection.exec_driver_sql("DELETE FROM services")


def test_older_scan_never_overwrites_newer(repository: Repository):
    new = Observation("1.1.1.1", 80, "HTTP", 200, "new")
    old = Observation("1.1.1.1", 80, "HTTP", 100, "old")

    repository.upsert_many([new])
    result = repository.upsert_many([old])

    assert stored_rows(repository.rows()) == expected_rows([new, old])
    assert result == UpsertResult(inserted=0, updated=1, unchanged=0)  # first_seen moved back


def test_replaying_a_batch_changes_nothing(repository: Repository):
    batch = [
        Observation("1.1.1.1", 80, "HTTP", 100, "x"),
        Observation("1.1.1.2", 80, "HTTP", 1, "y"),
    ]

    assert repository.upsert_many(batch) == UpsertResult(inserted=2, updated=0, unchanged=0)
    assert repository.upsert_many(batch) == UpsertResult(inserted=0, updated=0, unchanged=2)


def test_equal_timestamps_converge_on_the_greater_response(repository: Repository):
    a = Observation("1.1.1.1", 80, "HTTP", 100, "alpha")
    b = Observation("1.1.1.1", 80, "HTTP", 100, "beta")

    repository.upsert_many([b])
    repository.upsert_many([a])

    assert [r.response for r in repository.rows()] == ["beta"]


def test_duplicate_keys_in_one_batch_are_merged_first(repository: Repository):
    batch = [Observation("1.1.1.1", 80, "HTTP", ts, f"r{ts}") for ts in (5, 9, 1, 9, 3)]

    result = repository.upsert_many(batch)

    assert result == UpsertResult(inserted=1, updated=0, unchanged=0)
    assert stored_rows(repository.rows()) == expected_rows(batch)


def test_an_empty_batch_is_a_no_op(repository: Repository):
    assert repository.upsert_many([]) == UpsertResult(0, 0, 0)


def test_merge_keeps_the_greatest_pair_and_the_smallest_timestamp():
    rows = merge(
        [
            Observation("h", 1, "S", 5, "a"),
            Observation("h", 1, "S", 5, "b"),
            Observation("h", 1, "S", 2, "z"),
        ]
    )

    assert [(r.newest.timestamp, r.newest.response, r.first_seen) for r in rows] == [(5, "b", 2)]


def test_large_batches_span_several_sqlite_statements(sqlite_url: str):
    engine = open_engine(sqlite_url)
    migrate(engine)
    batch = [Observation(f"10.0.{i // 256}.{i % 256}", i, "HTTP", 1, "r") for i in range(9000)]

    assert Repository(engine).upsert_many(batch).inserted == 9000


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    observations=st.lists(observation, min_size=1, max_size=40),
    seed=st.randoms(use_true_random=False),
)
def test_any_order_and_batching_ends_at_the_oracle(
    repository: Repository, observations: list[Observation], seed: random.Random
):
    # Given the same observations, shuffled and cut into random batches, with duplicates
    clear(repository)
    deliveries = observations + seed.sample(observations, k=len(observations) // 2)
    seed.shuffle(deliveries)
    cuts = sorted(seed.sample(range(1, len(deliveries) + 1), k=min(3, len(deliveries))))
    # When each batch is upserted in turn
    start = 0
    for end in cuts:
        repository.upsert_many(deliveries[start:end])
        start = end
    repository.upsert_many(deliveries[start:])
    # Then the table is the oracle's
    assert stored_rows(repository.rows()) == expected_rows(observations)


def _writer(url: str, observations: list[Observation], seed: int) -> None:
    rng = random.Random(seed)
    deliveries = observations[:]
    rng.shuffle(deliveries)
    engine = open_engine(url)
    repository = Repository(engine)
    for start in range(0, len(deliveries), 25):
        repository.upsert_many(deliveries[start : start + 25])
    engine.dispose()


def _run_in_processes(target, args_list) -> None:
    # forkserver: children start fast (the store is imported once, in the server) and are not
    # forked from this process, which may hold gRPC threads.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["processor.storage", "processor.tests.integration.test_store"])
    processes = [context.Process(target=target, args=args) for args in args_list]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0] * len(processes)


def test_four_concurrent_writers_end_at_the_oracle(migrated_url: str):
    # Given overlapping observations over a few hundred keys (every writer sees all of them)
    rng = random.Random(7)
    observations = [
        Observation(
            f"1.1.1.{rng.randrange(40)}",
            rng.randrange(5),
            "HTTP",
            1_700_000_000 + rng.randrange(50),
            f"r{rng.randrange(10)}",
        )
        for _ in range(2000)
    ]
    # When four processes upsert them, each in its own shuffled order and batches
    _run_in_processes(_writer, [(migrated_url, observations, seed) for seed in range(4)])
    # Then no writer failed (no "database is locked" escaped) and the table is the oracle's
    engine = open_engine(migrated_url)
    assert stored_rows(Repository(engine).rows()) == expected_rows(observations)
    engine.dispose()


def _migrator(url: str) -> None:
    engine = open_engine(url)
    migrate(engine)
    Repository(engine).upsert_many([Observation("1.1.1.1", 80, "HTTP", 1, "x")])
    engine.dispose()


def test_five_processes_migrating_a_fresh_database_at_once_all_succeed(any_database_url: str):
    _run_in_processes(_migrator, [(any_database_url,)] * 5)

    engine = open_engine(any_database_url)
    with engine.connect() as connection:
        versions = connection.exec_driver_sql("SELECT version_num FROM alembic_version").all()
    assert versions == [("0002",)]
    assert len(Repository(engine).rows()) == 1
    engine.dispose()


def test_migrating_a_populated_0001_table_keeps_its_rows_and_its_merge_rule(
    any_database_url: str,
):
    """Catches a 0002 that rebuilds or loses rows, or that does not set the fillfactor."""
    # Given a table at revision 0001 holding rows
    engine = open_engine(any_database_url)
    migrate(engine, "0001")
    repository = Repository(engine)
    stored = [
        Observation(f"10.0.{i // 256}.{i % 256}", 80, "HTTP", 1_700_000_000 + i, f"r{i}")
        for i in range(3000)
    ]
    repository.upsert_many(stored)

    # When it is brought to the newest revision
    migrate(engine)

    # Then every row is as it was, at the newest revision; PostgreSQL keeps room on its pages
    assert stored_rows(repository.rows()) == expected_rows(stored)
    with engine.connect() as connection:
        versions = connection.exec_driver_sql("SELECT version_num FROM alembic_version").all()
        if engine.dialect.name == "postgresql":
            options = connection.exec_driver_sql(
                "SELECT reloptions FROM pg_class WHERE relname = 'services'"
            ).scalar()
            assert options == ["fillfactor=90"]
    assert versions == [("0002",)]
    # And the merge rule holds on the migrated table: newer wins, older only moves first_seen
    newer = stored[0]._replace(timestamp=1_800_000_000, response="newer")
    older = stored[1]._replace(timestamp=1_600_000_000, response="older")
    assert repository.upsert_many([newer, older]) == UpsertResult(0, 2, 0)
    assert stored_rows(repository.rows()) == expected_rows([*stored, newer, older])
    engine.dispose()


def test_the_settings_default_database_is_the_stores_own() -> None:
    from processor import config, storage

    assert config.DEFAULT_DATABASE_URL == storage.DEFAULT_DATABASE_URL


def test_the_schema_check_says_what_to_run_until_the_schema_is_at_the_newest_revision(
    any_database_url: str,
):
    engine = open_engine(any_database_url)
    assert "at revision none (no table yet)" in behind(engine)
    migrate(engine, "0001")
    problem = behind(engine)
    assert "at revision 0001, this version needs" in problem
    assert "run `mini-scan migrate`" in problem
    migrate(engine)
    assert behind(engine) is None
    engine.dispose()


def test_the_schema_check_tells_a_newer_schema_from_an_older_one(migrated_url: str):
    # Given a schema migrated by a later version than this one (a rollback of the processors)
    engine = open_engine(migrated_url)
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")

    assert "at revision 9999, newer than this version knows" in behind(engine)
    engine.dispose()
