"""The schema's Alembic revisions, and bringing a database to the newest one."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

_MIGRATIONS = Path(__file__).parent
_MIGRATION_LOCK_ID = 0x6D696E69  # "mini": the PostgreSQL advisory lock serialising migrations


def unsuitable(engine: Engine) -> str | None:
    """Why this database cannot hold the table as the merge rule needs it, or None.

    PostgreSQL must store text as UTF-8: a LATIN1 database refuses every response outside its
    alphabet row by row (each one dead-lettered), and SQL_ASCII stores bytes it never checks.
    """
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as connection:
        encoding = connection.exec_driver_sql("SHOW server_encoding").scalar()
    if encoding == "UTF8":
        return None
    return (
        f"the PostgreSQL database's encoding is {encoding}; mini-scan needs UTF8 "
        "(CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0)"
    )


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to the newest Alembic revision (or `revision`, for tests of a
    migration); safe when many processes start at once."""
    from alembic import command  # imported here: half a second of start-up, needed once
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    with engine.begin() as connection:
        # SQLite's BEGIN IMMEDIATE already serialises migrators; PostgreSQL needs a lock.
        if connection.dialect.name == "postgresql":
            # A migration may rewrite a large table: DATABASE_TIMEOUT is for batches, not this.
            connection.exec_driver_sql("SET LOCAL statement_timeout = 0")
            lock = sa.text("SELECT pg_advisory_xact_lock(:id)")
            connection.execute(lock, {"id": _MIGRATION_LOCK_ID})
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def behind(engine: Engine) -> str | None:
    """Why the schema is not at the newest revision this version knows, or None: for a process
    that must not migrate (its role has no DDL rights) and waits for `mini-scan migrate`."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(_MIGRATIONS))
    heads = set(script.get_heads())
    with engine.connect() as connection:
        current = set(MigrationContext.configure(connection).get_current_heads())
    if current == heads:
        return None
    found, needed = ", ".join(sorted(current)) or "none (no table yet)", ", ".join(sorted(heads))
    if current - {revision.revision for revision in script.walk_revisions()}:
        return (
            f"the database schema is at revision {found}, newer than this version knows "
            f"({needed}): run the version that migrated it"
        )
    return (
        f"the database schema is at revision {found}, this version needs {needed}: "
        "run `mini-scan migrate` as the database's owner"
    )


def drop_schema(engine: Engine) -> None:
    """Drop the table and the record of its revision: the database as it was before the first
    migration, for a test or a benchmark that starts from nothing. Every row is lost."""
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE IF EXISTS services")
        connection.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
