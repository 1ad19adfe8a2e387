"""The repository that merges observations into the `services` table.

The merge rule lives here and only here: for each `(ip, port, service)` the stored
`(last_scanned, response)` is the greatest `(timestamp, response)` pair ever received and
`first_seen` the smallest timestamp. Max and min are commutative, associative and idempotent,
so arrival order, duplicates and concurrent writers all end in the same table.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from processor.schema import Observation
from processor.storage import engine as _engine
from processor.storage.table import Service, UTCDateTime

# The canary: a row the table must accept unless the table itself is at fault. A documentation
# address (RFC 5737) and a service name no scanner sends; it is never committed.
CANARY_IP, CANARY_PORT, CANARY_SERVICE = "192.0.2.1", 9, "MINI-SCAN-CANARY"
CANARY_RESPONSE = "mini-scan canary: a known-good row, always rolled back"


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
        """End the database calls under way from another thread (`engine.interrupt`)."""
        _engine.interrupt(self.engine)

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
    return _merge_rule(
        postgresql.insert(Service.__table__).from_select(_COLUMNS, source), sa.func.least
    )


# xmax is 0 on a tuple this statement inserted, not on one it updated.
_POSTGRES_UPSERT = _postgres_statement().returning(sa.literal_column("(xmax = 0)"))


def _partitioned_statement() -> Any:
    # A partitioned table has no xmax to return: a changed key is new when the snapshot the
    # statement started from (which every part of it sees) does not hold it.
    table = Service.__table__
    changed = _postgres_statement().returning(table.c.ip, table.c.port, table.c.service).cte()
    stored = sa.select(sa.literal(1)).where(
        table.c.ip == changed.c.ip,
        table.c.port == changed.c.port,
        table.c.service == changed.c.service,
    )
    return sa.select(~stored.exists()).select_from(changed)


_PARTITIONED_UPSERT = _partitioned_statement()


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
    statement = _PARTITIONED_UPSERT if _partitioned(connection) else _POSTGRES_UPSERT
    changed = connection.execute(statement, params).all()
    inserted = sum(1 for (fresh,) in changed if fresh)
    return UpsertResult(inserted, len(changed) - inserted, len(rows) - len(changed))


def _partitioned(connection: Connection) -> bool:
    """Whether `services` is a partitioned table (deploy/postgres/partition-services.sql), read
    once per pooled connection."""
    known = connection.info.get("services_partitioned")
    if known is None:
        kind = connection.exec_driver_sql(
            "SELECT relkind FROM pg_class WHERE oid = 'services'::regclass"
        ).scalar()
        known = connection.info["services_partitioned"] = kind == "p"
    return known
