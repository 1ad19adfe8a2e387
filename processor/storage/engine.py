"""Engines for several processes sharing one database: SQLite's locking and durability, and
PostgreSQL's timeouts, under which every call gets an answer or an error in DATABASE_TIMEOUT, and
`interrupt`, which ends from another thread a call no timeout ended."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import weakref
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine, make_url

DEFAULT_DATABASE_URL = "sqlite:///data/scan_results.db"  # processor/config.py holds it equal
SQLITE_BUSY_TIMEOUT_S = 30  # when no timeout is given (the processor gives DATABASE_TIMEOUT)
KEEPALIVE_PROBES = 3


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


def interrupt(engine: Engine) -> None:
    """End the calls waiting on this engine's PostgreSQL connections (from another thread):
    their sockets are shut down and each call fails at once with a disconnection, which the pool
    then replaces. SQLite's calls end by themselves: a lock wait at its busy timeout, and nothing
    else waits on anyone."""
    for dbapi_connection in list(_CONNECTIONS.get(engine, ())):
        _shut_down(dbapi_connection)
