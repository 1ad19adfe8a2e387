"""The `services` table and the repository that merges observations into it.

The merge rule lives here and only here: for each `(ip, port, service)` the stored
`(last_scanned, response)` is the greatest `(timestamp, response)` pair ever received and
`first_seen` the smallest timestamp. Max and min are commutative, associative and idempotent,
so arrival order, duplicates and concurrent writers all end in the same table.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import os
import socket
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from processor.schema import Observation

DEFAULT_DATABASE_URL = "sqlite:///data/scan_results.db"
SQLITE_BUSY_TIMEOUT_S = 30  # when no timeout is given (the processor gives DATABASE_TIMEOUT)
KEEPALIVE_PROBES = 3
# The canary: a row the table must accept unless the table itself is at fault. A documentation
# address (RFC 5737) and a service name no scanner sends; it is never committed.
CANARY_IP, CANARY_PORT, CANARY_SERVICE = "192.0.2.1", 9, "MINI-SCAN-CANARY"
CANARY_RESPONSE = "mini-scan canary: a known-good row, always rolled back"
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

    def __add__(self, other: UpsertResult) -> UpsertResult:
        return UpsertResult(
            self.inserted + other.inserted,
            self.updated + other.updated,
            self.unchanged + other.unchanged,
        )


def database_url(url: str | None) -> URL:
    """Parse a `DATABASE_URL`; a bare `postgresql://` URL means psycopg 3."""
    parsed = make_url(url or DEFAULT_DATABASE_URL)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def open_engine(
    url: str | URL | None = None, *, pool_size: int = 2, timeout: float | None = None
) -> Engine:
    """An engine set up for several processes sharing the database.

    SQLite: WAL, a busy timeout (`timeout`, default 30 s), `synchronous=FULL` (a message is
    acked after its commit, so a commit must survive a power cut) and `BEGIN IMMEDIATE`, so a
    transaction takes the write lock up front instead of failing with "database is locked" when
    it upgrades a read.

    PostgreSQL with a `timeout`: no connect, statement, or silent network may take much longer
    (see `postgres_timeouts`); `Repository.interrupt()` ends what they cannot.
    """
    parsed = url if isinstance(url, URL) else database_url(url)
    if parsed.get_backend_name() != "sqlite":
        connect_args = postgres_timeouts(timeout, parsed.query) if timeout else {}
        engine = sa.create_engine(
            parsed, pool_pre_ping=True, pool_size=pool_size, connect_args=connect_args
        )
        opened = _CONNECTIONS[engine] = weakref.WeakSet()
        sa.event.listen(engine, "connect", lambda dbapi_connection, _: opened.add(dbapi_connection))
        return engine
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    busy_timeout = timeout or SQLITE_BUSY_TIMEOUT_S
    # Each batch size is a different multi-row statement; the driver's default cache of 128
    # prepared statements, some of them thousands of parameters long, costs tens of MB.
    engine = sa.create_engine(
        parsed, connect_args={"timeout": busy_timeout, "cached_statements": 16}
    )

    @sa.event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={round(busy_timeout * 1000)}")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def postgres_timeouts(timeout: float, query: Any = ()) -> dict[str, Any]:
    """libpq connection parameters under which a call gets an answer or an error in about
    `timeout` seconds, whatever the network does:

    - `connect_timeout`: a connection attempt (psycopg enforces it; at least 2 s);
    - server side, through `options`: `statement_timeout` (a statement, lock waits included)
      and `idle_in_transaction_session_timeout` (a session whose client vanished mid-transaction
      stops holding its row locks);
    - TCP keepalives: a peer that stops answering while we wait for a result is dropped after
      about `timeout` (probes every timeout/4 s, 3 unanswered);
    - `tcp_user_timeout`: data unacknowledged for `timeout` drops the connection.

    A parameter already in the URL's query wins; `options` are appended to the URL's own.
    """
    ms = max(1, round(timeout * 1000))
    probe = max(1, int(timeout // 4))
    server = f"-c statement_timeout={ms} -c idle_in_transaction_session_timeout={ms}"
    wanted: dict[str, Any] = {
        "connect_timeout": max(2, math.ceil(timeout)),
        "keepalives": 1,
        "keepalives_idle": probe,
        "keepalives_interval": probe,
        "keepalives_count": KEEPALIVE_PROBES,
        "tcp_user_timeout": ms,
        "options": f"{query['options']} {server}" if "options" in query else server,
    }
    return {name: value for name, value in wanted.items() if name == "options" or name not in query}


# The DBAPI connections each PostgreSQL engine opened, so that a call waiting on one of them can
# be ended from another thread (psycopg cannot time out a query by itself).
_CONNECTIONS: weakref.WeakKeyDictionary[Engine, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()


def _shut_down(dbapi_connection: Any) -> None:
    """Shut the connection's socket down (not close it: libpq still owns the descriptor), so
    whatever waits on it wakes with "server closed the connection" at once."""
    if dbapi_connection.closed:
        return
    with contextlib.suppress(Exception):  # already broken, or closed in the meantime
        duplicate = socket.socket(fileno=os.dup(dbapi_connection.pgconn.socket))
        with duplicate:
            duplicate.shutdown(socket.SHUT_RDWR)


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


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision; safe when many processes start at once."""
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
        command.upgrade(config, "head")


class MergedRow(NamedTuple):
    """The best observation of one key in a batch, and the earliest timestamp seen for it."""

    newest: Observation
    first_seen: int


def merge(observations: Iterable[Observation]) -> list[MergedRow]:
    """Collapse a batch to one row per key by the merge rule; PostgreSQL refuses to touch a row
    twice in one statement, and fewer rows make a cheaper statement anyway."""
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
    # Key order: concurrent writers then lock rows in the same order and cannot deadlock.
    return [MergedRow(newest[key], earliest[key]) for key in sorted(newest)]


class Repository:
    """Reads and writes the `services` table; knows nothing of Pub/Sub."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._write = _sqlite_upsert if engine.dialect.name == "sqlite" else _postgres_upsert

    def upsert_many(self, observations: Iterable[Observation]) -> UpsertResult:
        """Merge a batch into the table in one transaction and one statement.

        Raises SQLAlchemy's errors unchanged; the caller decides what is transient.
        """
        rows = merge(observations)
        if not rows:
            return UpsertResult(0, 0, 0)
        with self.engine.begin() as connection:
            return self._write(connection, rows, dt.datetime.now(dt.UTC))

    def accepts_a_known_good_row(self) -> bool:
        """Whether the table still takes a valid row: the canary (`CANARY_IP`, a reserved service
        name, timestamp now) is upserted in a transaction that is always rolled back.

        False if the database refuses it (a constraint, a type); an unavailable database raises
        as `upsert_many` does. Never commits.
        """
        now = dt.datetime.now(dt.UTC)
        stamp = int(now.timestamp())
        canary = Observation(CANARY_IP, CANARY_PORT, CANARY_SERVICE, stamp, CANARY_RESPONSE)
        with self.engine.connect() as connection:
            transaction = connection.begin()
            try:
                self._write(connection, [MergedRow(canary, stamp)], now)
            except (sa.exc.IntegrityError, sa.exc.DataError):
                return False
            finally:
                transaction.rollback()
        return True

    def interrupt(self) -> None:
        """End the calls waiting on this repository's PostgreSQL connections (from another
        thread): their sockets are shut down and each call fails at once with a disconnection,
        which the pool then replaces. SQLite's calls end by themselves: a lock wait at its busy
        timeout, and nothing else waits on anyone."""
        for dbapi_connection in list(_CONNECTIONS.get(self.engine, ())):
            _shut_down(dbapi_connection)

    def rows(self) -> list[sa.Row[Any]]:
        """Every stored row in key order (for tests and small exports)."""
        table = Service.__table__
        with self.engine.connect() as connection:
            return list(connection.execute(sa.select(table).order_by(*table.primary_key)))


_COLUMNS = ("ip", "port", "service", "last_scanned", "response", "first_seen", "updated_at")


def _merge_rule(stmt: Any, least: Any) -> Any:
    """`ON CONFLICT DO UPDATE` applying the merge rule; rows the batch cannot improve are not
    written at all, so the database reports them as unchanged."""
    new, old = stmt.excluded, Service.__table__.c
    newer = sa.or_(
        new.last_scanned > old.last_scanned,
        sa.and_(new.last_scanned == old.last_scanned, new.response > old.response),
    )
    return stmt.on_conflict_do_update(
        index_elements=[old.ip, old.port, old.service],
        set_={
            "last_scanned": sa.case((newer, new.last_scanned), else_=old.last_scanned),
            "response": sa.case((newer, new.response), else_=old.response),
            "first_seen": least(old.first_seen, new.first_seen),
            "updated_at": new.updated_at,
        },
        where=sa.or_(newer, new.first_seen < old.first_seen),
    )


def _sqlite_statement() -> tuple[str, str, str]:
    """The upsert as SQL text in three parts, so a batch becomes one multi-row VALUES statement:
    `head + ", ".join([row] * n) + tail`. One statement per batch runs at about the speed of a
    plain executemany INSERT, and SQLAlchemy never touches a value."""

    def stamp(name: str) -> Any:
        # Unix seconds to the text SQLAlchemy's SQLite DateTime reads and writes, in SQLite.
        unix = sa.func.datetime(sa.bindparam(name), sa.literal_column("'unixepoch'"))
        return unix.concat(sa.literal_column("'.000000'"))

    values = sqlite.insert(Service.__table__).values(
        ip=sa.bindparam("ip"),
        port=sa.bindparam("port"),
        service=sa.bindparam("service"),
        last_scanned=stamp("timestamp"),
        response=sa.bindparam("response"),
        first_seen=stamp("first_seen"),
        updated_at=sa.bindparam("now"),
    )
    compiled = _merge_rule(values, sa.func.min).compile(dialect=sqlite.dialect(paramstyle="qmark"))
    assert compiled.positiontup == list(_SQLITE_PARAMS), compiled.positiontup
    sql = str(compiled)
    head, _, rest = sql.partition(" VALUES ")
    row, _, tail = rest.partition(" ON CONFLICT ")
    assert "?" not in tail, "the conflict clause must take no parameters"
    return f"{head} VALUES ", row, f" ON CONFLICT {tail}"


_SQLITE_PARAMS = ("ip", "port", "service", "timestamp", "response", "first_seen", "now")
_SQLITE_HEAD, _SQLITE_ROW, _SQLITE_TAIL = _sqlite_statement()
# SQLite allows 32,766 parameters in a statement: larger batches take several statements.
_SQLITE_ROWS_PER_STATEMENT = 4000


def _sqlite_upsert(connection: Connection, rows: list[MergedRow], now: dt.datetime) -> UpsertResult:
    # Inserted rows are counted from rowids: this transaction holds the write lock, and each
    # fresh row takes the next rowid.
    stamp = now.strftime("%Y-%m-%d %H:%M:%S.%f")
    before = _max_rowid(connection)
    changed = 0
    for start in range(0, len(rows), _SQLITE_ROWS_PER_STATEMENT):
        chunk = rows[start : start + _SQLITE_ROWS_PER_STATEMENT]
        sql = _SQLITE_HEAD + ", ".join([_SQLITE_ROW] * len(chunk)) + _SQLITE_TAIL
        params = []
        for o, first in chunk:
            params += (o.ip, o.port, o.service, o.timestamp, o.response, first, stamp)
        changed += connection.exec_driver_sql(sql, tuple(params)).rowcount
    inserted = _max_rowid(connection) - before
    return UpsertResult(inserted, changed - inserted, len(rows) - changed)


def _max_rowid(connection: Connection) -> int:
    # Straight to the driver: SQLAlchemy's per-statement work would cost more than the query.
    cursor = connection.connection.driver_connection.execute(  # type: ignore[union-attr]
        "SELECT coalesce(max(rowid), 0) FROM services"
    )
    return int(cursor.fetchone()[0])


def _postgres_statement() -> Any:
    # The batch travels as one array per column and is unnested server side: one statement, one
    # round trip, whatever the batch size.
    array = postgresql.ARRAY
    batch = (
        sa.func.unnest(
            sa.bindparam("ip", type_=array(sa.Text)),
            sa.bindparam("port", type_=array(sa.Integer)),
            sa.bindparam("service", type_=array(sa.Text)),
            sa.bindparam("timestamp", type_=array(sa.BigInteger)),
            sa.bindparam("response", type_=array(sa.Text)),
            sa.bindparam("first_seen", type_=array(sa.BigInteger)),
        )
        .table_valued("ip", "port", "service", "timestamp", "response", "first_seen")
        .render_derived()
    )
    c = batch.c
    source = sa.select(
        c.ip,
        c.port,
        c.service,
        sa.func.to_timestamp(c.timestamp),
        c.response,
        sa.func.to_timestamp(c.first_seen),
        sa.bindparam("now", type_=UTCDateTime),
    )
    stmt = postgresql.insert(Service.__table__).from_select(_COLUMNS, source)
    # xmax is 0 on a tuple this statement inserted, not on one it updated.
    return _merge_rule(stmt, sa.func.least).returning(sa.literal_column("(xmax = 0)"))


_POSTGRES_UPSERT = _postgres_statement()


def _postgres_upsert(
    connection: Connection, rows: list[MergedRow], now: dt.datetime
) -> UpsertResult:
    params = {
        "ip": [o.ip for o, _ in rows],
        "port": [o.port for o, _ in rows],
        "service": [o.service for o, _ in rows],
        "timestamp": [o.timestamp for o, _ in rows],
        "response": [o.response for o, _ in rows],
        "first_seen": [first for _, first in rows],
        "now": now,
    }
    changed = connection.execute(_POSTGRES_UPSERT, params).all()
    inserted = sum(1 for (fresh,) in changed if fresh)
    return UpsertResult(inserted, len(changed) - inserted, len(rows) - len(changed))
