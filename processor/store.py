"""The `services` table and the repository that merges observations into it.

The merge rule lives here and only here: for each `(ip, port, service)` the stored
`(last_scanned, response)` is the greatest `(timestamp, response)` pair ever received and
`first_seen` the smallest timestamp. Max and min are commutative, associative and idempotent,
so arrival order, duplicates and concurrent writers all end in the same table.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from processor.schema import Observation

DEFAULT_DATABASE_URL = "sqlite:///data/scan_results.db"
SQLITE_BUSY_TIMEOUT_S = 30
_MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATION_LOCK_ID = 0x6D696E69  # "mini": the PostgreSQL advisory lock serialising migrations


class UTCDateTime(sa.TypeDecorator[dt.datetime]):
    """A timezone-aware UTC timestamp on every dialect (SQLite stores naive UTC text)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


# Responses are compared byte-wise ("C" collation on PostgreSQL, SQLite's BINARY): the same
# order as Python's str comparison, so the in-batch merge and the database agree on ties.
ResponseText = sa.Text().with_variant(sa.Text(collation="C"), "postgresql")


class Base(DeclarativeBase):
    pass


class Service(Base):
    """One row per unique `(ip, port, service)`: a contract other tools read."""

    __tablename__ = "services"

    ip: Mapped[str] = mapped_column(sa.String(45), primary_key=True)
    port: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    service: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    last_scanned: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    response: Mapped[str] = mapped_column(ResponseText)
    first_seen: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)


@dataclass(frozen=True, slots=True)
class UpsertResult:
    inserted: int
    updated: int
    unchanged: int  # rows left as they were because the stored scan was as new or newer


def database_url(url: str | None) -> URL:
    """Parse a `DATABASE_URL`; a bare `postgresql://` URL means psycopg 3."""
    parsed = make_url(url or DEFAULT_DATABASE_URL)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def open_engine(url: str | URL | None = None, *, pool_size: int = 2) -> Engine:
    """An engine set up for several processes sharing the database.

    SQLite: WAL, a busy timeout, `synchronous=FULL` (a message is acked after its commit, so a
    commit must survive a power cut) and `BEGIN IMMEDIATE`, so a transaction takes the write
    lock up front instead of failing with "database is locked" when it upgrades a read.
    """
    parsed = url if isinstance(url, URL) else database_url(url)
    if parsed.get_backend_name() != "sqlite":
        return sa.create_engine(parsed, pool_pre_ping=True, pool_size=pool_size)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

    @sa.event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision; safe when many processes start at once."""
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    with engine.begin() as connection:
        # SQLite's BEGIN IMMEDIATE already serialises migrators; PostgreSQL needs a lock.
        if connection.dialect.name == "postgresql":
            lock = sa.text("SELECT pg_advisory_xact_lock(:id)")
            connection.execute(lock, {"id": _MIGRATION_LOCK_ID})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def merge(observations: Iterable[Observation]) -> list[dict[str, Any]]:
    """Collapse a batch to one row per key by the merge rule (PostgreSQL refuses to touch a row
    twice in one statement), as bind parameters for the upsert."""
    newest: dict[tuple[str, int, str], Observation] = {}
    earliest: dict[tuple[str, int, str], int] = {}
    for obs in observations:
        key = (obs.ip, obs.port, obs.service)
        kept = newest.get(key)
        if kept is None:
            newest[key], earliest[key] = obs, obs.timestamp
            continue
        if (obs.timestamp, obs.response) > (kept.timestamp, kept.response):
            newest[key] = obs
        if obs.timestamp < earliest[key]:
            earliest[key] = obs.timestamp
    return [
        {
            "ip": obs.ip,
            "port": obs.port,
            "service": obs.service,
            "last_scanned": _utc(obs.timestamp),
            "response": obs.response,
            "first_seen": _utc(earliest[key]),
        }
        for key, obs in newest.items()
    ]


class Repository:
    """Reads and writes the `services` table; knows nothing of Pub/Sub."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._upsert = _upsert_statement(engine.dialect.name)

    def upsert_many(self, observations: Iterable[Observation]) -> UpsertResult:
        """Merge a batch into the table in one transaction and one statement."""
        rows = merge(observations)
        if not rows:
            return UpsertResult(0, 0, 0)
        now = dt.datetime.now(dt.UTC)
        for row in rows:
            row["updated_at"] = now
        with self.engine.begin() as connection:
            newest_rowid = _newest_rowid(connection)
            changed = connection.execute(self._upsert, rows).all()
        inserted = sum(1 for (marker,) in changed if _was_inserted(marker, newest_rowid))
        return UpsertResult(inserted, len(changed) - inserted, len(rows) - len(changed))

    def ping(self) -> None:
        """Raise if the database cannot be reached."""
        with self.engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))

    def rows(self) -> Iterator[Service]:
        """Every stored row, in key order (for tests and small exports)."""
        with self.engine.connect() as connection:
            result = connection.execute(sa.select(Service.__table__).order_by(*_KEY))
            yield from result  # type: ignore[misc]


_KEY = (Service.ip, Service.port, Service.service)


def _utc(timestamp: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC)


def _upsert_statement(dialect: str) -> sa.UpdateBase:
    table = Service.__table__
    stmt = (sqlite.insert if dialect == "sqlite" else postgresql.insert)(table)
    new, old = stmt.excluded, table.c
    newer = sa.or_(
        new.last_scanned > old.last_scanned,
        sa.and_(new.last_scanned == old.last_scanned, new.response > old.response),
    )
    least = sa.func.min if dialect == "sqlite" else sa.func.least  # SQLite's 2-argument min()
    stmt = stmt.on_conflict_do_update(
        index_elements=[old.ip, old.port, old.service],
        set_={
            "last_scanned": sa.case((newer, new.last_scanned), else_=old.last_scanned),
            "response": sa.case((newer, new.response), else_=old.response),
            "first_seen": least(old.first_seen, new.first_seen),
            "updated_at": new.updated_at,
        },
        # Rows this batch cannot improve are not written at all: nothing returned, "unchanged".
        where=sa.or_(newer, new.first_seen < old.first_seen),
    )
    # Which rows were inserted: PostgreSQL's xmax is 0 for a fresh tuple; on SQLite (one writer
    # at a time) a fresh row gets a rowid above the largest one before the statement.
    marker = sa.literal_column("rowid") if dialect == "sqlite" else sa.literal_column("(xmax = 0)")
    return stmt.returning(marker)


def _newest_rowid(connection: Connection) -> int | None:
    if connection.dialect.name != "sqlite":
        return None
    newest = connection.exec_driver_sql("SELECT coalesce(max(rowid), 0) FROM services")
    return int(newest.scalar_one())


def _was_inserted(marker: Any, newest_rowid: int | None) -> bool:
    return bool(marker) if newest_rowid is None else int(marker) > newest_rowid
