"""Fixtures shared by every test package: real databases, skipped locally when absent."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from emulator.testing import IN_CI
from processor.storage import database_url, migrate, open_engine
from processor.storage.migrations import drop_schema

POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _postgres_reachable(url: sa.URL) -> str | None:
    try:
        engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
    except sa.exc.OperationalError as exc:
        return str(exc).splitlines()[0]
    return None


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A database of its own on the PostgreSQL server, for this test session only."""
    admin = database_url(POSTGRES_ADMIN_URL)
    problem = _postgres_reachable(admin)
    if problem:
        message = f"PostgreSQL not reachable at {admin.render_as_string()}: {problem}"
        if IN_CI:
            pytest.fail(message + " (CI=true: PostgreSQL tests must run)")
        pytest.skip(message)
    name = f"mini_scan_test_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield admin.set(database=name).render_as_string(hide_password=False)
    with engine.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    engine.dispose()


def _reset(url: str) -> None:
    engine = open_engine(url)
    drop_schema(engine)
    engine.dispose()


@pytest.fixture
def postgres_url(postgres_server_url: str) -> str:
    """An empty PostgreSQL database (no tables yet)."""
    _reset(postgres_server_url)
    return postgres_server_url


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """An empty SQLite file (no tables yet)."""
    return f"sqlite:///{tmp_path / 'scan_results.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs once on SQLite and once on PostgreSQL."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return request.getfixturevalue(name)


@pytest.fixture
def migrated_url(any_database_url: str) -> str:
    engine = open_engine(any_database_url)
    migrate(engine)
    engine.dispose()
    return any_database_url
