"""Drain rate against table size: the processor on tables of up to tens of millions of rows.

For each database and table size the table is preloaded in one transaction (one INSERT ... SELECT
over generated keys, server side: PostgreSQL's generate_series, SQLite's recursive CTE), then
two backlogs of --count messages are drained by the processor at its default settings (a child
of bench/e2e.py, as its rows (b) and (c) run):

  insert: new keys, spread at random between the stored ones (a different index leaf per row);
  update: newer scans of random stored keys: the re-scan steady state.

The small-table rates the ratios divide by: inserts into an empty table, and updates of a table
holding just the scanned keys. Stored keys take the even slots of one key space and new keys the
odd ones, so a new key is never a stored one and lands anywhere in the index.

    nice -n 10 uv run python -m bench.growth [--sizes 0,1000000,5000000,20000000]
        [--count 100000] [--databases sqlite,postgresql] [--postgres URL]

Writes the table, docs/img/growth.json and the plot docs/img/growth.png. PostgreSQL runs in a
database of its own (mini_scan_growth_<pid>), SQLite in a file under /tmp; both are removed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import random
import re
import resource
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from bench.e2e import DEFAULT_POSTGRES, publish, run_child
from emulator.testing import emulator_process
from processor.schema import Observation, encode
from processor.storage import migrate, open_engine
from scanner.generator import SERVICES, Kind, ScanMessage

PORTS = (80, 22, 53)  # one per service in SERVICES, so a slot names one key
FIRST_HOST = 1 << 24  # 1.0.0.0: slot s is host s // 3 above it, service s % 3
PRELOADED_AGE_S = 2 * 86_400  # stored rows are older than every message, so updates win
PATHS = ("insert", "update")
_SQLITE_STAMP = "%Y-%m-%d %H:%M:%S.%f"  # the repository's SQLite timestamp text


def key(slot: int) -> tuple[str, int, str]:
    """The key in `slot`; `_KEY_SQL` computes the same in SQL."""
    return str(ipaddress.IPv4Address(FIRST_HOST + slot // 3)), PORTS[slot % 3], SERVICES[slot % 3]


def _key_sql(slot: str) -> str:
    host = f"({slot}) / 3 + {FIRST_HOST}"
    octets = " || '.' || ".join(f"((({host}) >> {shift}) & 255)" for shift in (24, 16, 8, 0))
    port = " ".join(f"WHEN {i} THEN {p}" for i, p in enumerate(PORTS))
    service = " ".join(f"WHEN {i} THEN '{s}'" for i, s in enumerate(SERVICES))
    return (
        f"{octets}, CASE ({slot}) % 3 {port} END, CASE ({slot}) % 3 {service} END, "
        "'service response: ' || ((" + slot + ") % 100)"
    )


_COLUMNS = "ip, port, service, response, last_scanned, first_seen, updated_at"
# Stored row j sits in slot 2j; its timestamps are one parameter (`stamp`).
# Joined from this module's constants only (nothing from outside reaches the SQL).
_SQLITE_PRELOAD = " ".join(
    (
        "WITH RECURSIVE n(j) AS (SELECT ? UNION ALL SELECT j + 1 FROM n WHERE j + 1 < ?)",
        f"INSERT INTO services ({_COLUMNS}) SELECT",
        _key_sql("2 * j"),
        ", ?3, ?3, ?3 FROM n",
    )
)
_POSTGRES_PRELOAD = " ".join(
    (
        f"INSERT INTO services ({_COLUMNS}) SELECT",
        _key_sql("2 * j").replace(" % ", " %% "),
        ", %(stamp)s, %(stamp)s, %(stamp)s",
        "FROM generate_series(%(low)s::bigint, %(high)s::bigint - 1) j",
    )
)


# ---- the two databases: preload, size, and what a drain cost -------------------------------


class SQLiteTable:
    name = "sqlite"

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / "growth.db"
        self.url = f"sqlite:///{self.path}"
        engine = open_engine(self.url)
        migrate(engine)
        engine.dispose()

    def preload(self, low: int, high: int, stamp: dt.datetime) -> None:
        # One transaction without a journal (nothing to recover: a failed preload is rerun),
        # with a page cache big enough for the index; the processor's settings come back after.
        with self._connection() as connection:
            connection.execute("PRAGMA journal_mode=OFF")
            connection.execute("PRAGMA cache_size=-1000000")
            connection.execute("BEGIN")
            connection.execute(_SQLITE_PRELOAD, (low, high, stamp.strftime(_SQLITE_STAMP)))
            connection.execute("COMMIT")
            connection.execute("PRAGMA journal_mode=WAL")

    def before_drain(self) -> dict[str, float]:
        return {}

    def after_drain(self, before: dict[str, float], messages: int) -> dict[str, float]:
        return {}

    def sizes(self) -> tuple[int, int, int]:
        """(rows, table bytes, index bytes)."""
        with self._connection() as connection:
            rows = connection.execute("SELECT count(*) FROM services").fetchone()[0]
            pages = dict(
                connection.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name").fetchall()
            )
        return rows, pages.get("services", 0), pages.get("sqlite_autoindex_services_1", 0)

    def clear(self) -> None:
        with self._connection() as connection:
            connection.execute("DELETE FROM services")
            connection.execute("VACUUM")

    def drop(self) -> None:
        shutil.rmtree(self.path.parent, ignore_errors=True)

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        connection = sqlite3.connect(self.path, isolation_level=None)
        try:
            yield connection
        finally:
            connection.close()


_DATABASES: list[str] = []  # one per PostgreSQL variant in this run


class PostgresTable:
    name = "postgresql"

    def __init__(self, server_url: str, variant: str = "", setup: str = "") -> None:
        self.name = f"postgresql ({variant})" if variant else "postgresql"
        self.server = open_engine(server_url)
        self.database = f"mini_scan_growth_{os.getpid()}_{len(_DATABASES)}"
        _DATABASES.append(self.database)
        with self.server.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql(
                f"CREATE DATABASE {self.database} ENCODING 'UTF8' TEMPLATE template0"
            )
        self.url = sa.make_url(server_url).set(database=self.database).render_as_string(False)
        self.engine = open_engine(self.url)
        migrate(self.engine)
        for statement in filter(None, setup.format(database=self.database).split(";")):
            self._autocommit(statement)
        self.engine.dispose()  # sessions opened from now on see the database's new settings

    def preload(self, low: int, high: int, stamp: dt.datetime) -> None:
        with self.engine.begin() as connection:
            params = {"low": low, "high": high, "stamp": stamp}
            connection.exec_driver_sql(_POSTGRES_PRELOAD, params)
        # What autovacuum would have done to a table this old (hint bits, visibility map), and
        # a checkpoint, so every drain starts with the same full-page writes ahead of it.
        self._autocommit("VACUUM (ANALYZE) services", "CHECKPOINT")

    def before_drain(self) -> dict[str, float]:
        self._autocommit("CHECKPOINT")
        return self._counters()

    def after_drain(self, before: dict[str, float], messages: int) -> dict[str, float]:
        after = self._counters()
        delta = {name: after[name] - before[name] for name in after}
        updates = delta["updates"]
        return {
            "wal_bytes_per_msg": delta["wal"] / messages,
            "blocks_read_per_msg": delta["read"] / messages,
            "blocks_hit_per_msg": delta["hit"] / messages,
            "hot_update_share": delta["hot"] / updates if updates else float("nan"),
        }

    def _counters(self) -> dict[str, float]:
        with self.engine.connect() as connection:
            connection.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
            wal = connection.exec_driver_sql("SELECT pg_current_wal_lsn() - '0/0'").scalar()
            read, hit = connection.exec_driver_sql(
                "SELECT blks_read, blks_hit FROM pg_stat_database "
                "WHERE datname = current_database()"
            ).one()
            updates, hot = connection.exec_driver_sql(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                "WHERE relname = 'services'"
            ).one()
        return {"wal": float(wal), "read": read, "hit": hit, "updates": updates, "hot": hot}

    def sizes(self) -> tuple[int, int, int]:
        with self.engine.connect() as connection:
            return tuple(  # type: ignore[return-value]
                connection.exec_driver_sql(
                    "SELECT count(*), pg_table_size('services'), pg_indexes_size('services') "
                    "FROM services"
                ).one()
            )

    def clear(self) -> None:
        self._autocommit("TRUNCATE services")

    def drop(self) -> None:
        self.engine.dispose()
        with self.server.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {self.database} WITH (FORCE)")
        self.server.dispose()

    def _autocommit(self, *statements: str) -> None:
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            for statement in statements:
                connection.exec_driver_sql(statement)


# ---- backlogs and drains ---------------------------------------------------------------------


def backlog(slots: list[int], now: int, rng: random.Random) -> list[ScanMessage]:
    """One fresh scan (timestamp `now`, a v2 message) of each slot's key."""
    messages = []
    for seq, slot in enumerate(slots):
        observation = Observation(*key(slot), now, f"service response: {rng.randrange(100)}")
        messages.append(ScanMessage(seq, Kind.VALID, encode(observation), observation, 2, None))
    return messages


def new_slots(count: int, stored: int, used: set[int], rng: random.Random) -> list[int]:
    """`count` odd slots (never stored) spread over the stored ones, none drained before."""
    span = max(stored, count * 10)
    chosen: list[int] = []
    while len(chosen) < count:
        slot = 2 * rng.randrange(span) + 1
        if slot not in used:
            used.add(slot)
            chosen.append(slot)
    return chosen


def drain(table: Any, path: str, slots: list[int], args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(len(slots) * 7 + len(path))
    topic = re.sub(r"[^A-Za-z0-9]+", "-", f"growth {table.name} {path}")  # a variant's label
    subscription = publish(backlog(slots, int(time.time()), rng), topic)
    before = table.before_drain()
    # The child's writes to storage (SQLite writes from inside the processor; PostgreSQL's
    # server does its own, counted as WAL instead).
    written = resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock
    result = run_child("processor", subscription, len(slots), table.url, args)
    written = resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock - written
    result["written_bytes_per_msg"] = written * 512 / result["messages"]
    result.update(table.after_drain(before, result["messages"]))
    result["rate"] = result["messages"] / result["seconds"]
    return result


def measure(
    table: Any, args: argparse.Namespace, console: Console, earlier: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Every size and both paths on one database, growing one table; every result is saved
    as soon as it is measured (with the `earlier` ones), so a stopped run keeps what it did."""
    rng = random.Random(19)
    stamp = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=PRELOADED_AGE_S)
    used: set[int] = set()
    results: list[dict[str, Any]] = []
    stored = 0
    for size in args.sizes:
        for path in PATHS:
            if size == 0:  # the small tables: empty, then just the keys the drain updates
                table.clear()
                stored = 0
            target = max(size, args.count) if path == "update" else size
            if target > stored:
                started = time.perf_counter()
                table.preload(stored, target, stamp)
                console.print(
                    f"  {table.name}: preloaded {target - stored:,} rows "
                    f"in {time.perf_counter() - started:.0f} s"
                )
                stored = target
            if path == "insert":
                slots = new_slots(args.count, stored, used, rng)
            else:
                slots = [2 * j for j in rng.sample(range(stored), args.count)]
            result = drain(table, path, slots, args)
            rows, table_bytes, index_bytes = table.sizes()
            result.update(
                database=table.name,
                size=size,
                path=path,
                rows=rows,
                table_bytes_per_row=table_bytes / rows,
                index_bytes_per_row=index_bytes / rows,
                load=os.getloadavg()[0],
            )
            console.print(
                f"  {table.name} {size:,} {path}: {result['rate']:,.0f} msg/s "
                f"(load {result['load']:.2f})"
            )
            results.append(result)
            save(earlier + results, args, "partial: " + " ".join(sys.argv[1:]))
    return results


def save(results: list[dict[str, Any]], args: argparse.Namespace, title: str) -> None:
    out = Path(args.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {"title": title, "argv": sys.argv[1:], "results": results}
    out.write_text(json.dumps(document, indent=1))


# ---- report ----------------------------------------------------------------------------------


def with_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    smallest = min(r["size"] for r in results)
    base = {(r["database"], r["path"]): r["rate"] for r in results if r["size"] == smallest}
    for r in results:
        r["ratio"] = r["rate"] / base[(r["database"], r["path"])]
    return results


def print_table(results: list[dict[str, Any]], console: Console, title: str) -> None:
    table = Table(title=title)
    columns = (
        "rows",
        "path",
        "database",
        "msg/s",
        "ratio",
        "CPU µs/msg",
        "RSS MB",
        "table B/row",
        "index B/row",
        "written B/msg",
        "WAL B/msg",
        "blocks read/msg",
        "HOT share",
        "load",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for r in results:
        pg = r["database"].startswith("postgresql")
        table.add_row(
            f"{r['rows']:,}",
            r["path"],
            r["database"],
            f"{r['rate']:,.0f}",
            f"{r['ratio']:.2f}",
            f"{r['cpu'] / r['messages'] * 1e6:.0f}",
            f"{r['rss_mb']:.0f}",
            f"{r['table_bytes_per_row']:.0f}",
            f"{r['index_bytes_per_row']:.0f}",
            f"{r['written_bytes_per_msg']:,.0f}" if "written_bytes_per_msg" in r and not pg else "",
            f"{r['wal_bytes_per_msg']:,.0f}" if pg else "",
            f"{r['blocks_read_per_msg']:.2f}" if pg else "",
            f"{r['hot_update_share']:.0%}" if pg and r["path"] == "update" else "",
            f"{r['load']:.2f}",
        )
    console.print(table)


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for axis, kind in zip(axes, PATHS, strict=True):
        databases = dict.fromkeys(r["database"] for r in results)
        for database, marker in zip(databases, "os^vD<>", strict=False):
            points = [r for r in results if r["path"] == kind and r["database"] == database]
            xs = [r["size"] / 1e6 for r in points]
            axis.plot(xs, [r["rate"] for r in points], marker=marker, label=database)
            for x, r in zip(xs, points, strict=True):
                axis.annotate(
                    f"{r['ratio']:.2f} (load {r['load']:.0f})",  # the machine's share in it
                    (x, r["rate"]),
                    textcoords="offset points",
                    xytext=(4, 6),
                    fontsize=8,
                )
        label = "new keys (insert path)" if kind == "insert" else "newer scans (update path)"
        axis.set_title(label)
        axis.set_xlabel("rows in the table before the drain (millions)")
        axis.grid(alpha=0.3)
        axis.legend()
    axes[0].set_ylabel("messages drained per second")
    axes[0].set_ylim(bottom=0)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def report(
    results: list[dict[str, Any]], args: argparse.Namespace, title: str, console: Console
) -> int:
    """The table on the console, the results beside the plot, and the plot."""
    print_table(results, console, title)
    out = Path(args.out)
    save(results, args, title)
    plot(results, out, title)
    console.print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def replot(args: argparse.Namespace) -> int:
    """One table and plot from saved runs: each run's rows keep their own ratios; a database
    measured in several runs is labelled with its run's start from the second on."""
    console = Console(width=160)
    wanted = args.databases.split(",")
    results, titles, seen = [], [], set()
    for path in args.replot:
        saved = json.loads(Path(path).read_text())
        kept = with_ratios([r for r in saved["results"] if r["database"] in wanted])
        started = re.search(r"\d\d:\d\d UTC", saved["title"])
        for r in kept:
            if r["database"] in seen and started:
                r["database"] += f" ({started.group()} run)"
        seen |= {r["database"] for r in kept}
        results += kept
        titles.append(f"{', '.join(dict.fromkeys(r['database'] for r in kept))}: {saved['title']}")
    title = "\n".join(titles)
    return report(results, args, title, console)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,1000000,5000000,20000000")
    parser.add_argument("--count", type=int, default=100_000, help="messages per drain")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--postgres", default=os.environ.get("TEST_DATABASE_URL", DEFAULT_POSTGRES))
    parser.add_argument(
        "--postgres-variant",
        action="append",
        default=[],
        metavar="NAME=SQL",
        help="also measure PostgreSQL in a database set up with SQL after migrating "
        "('{database}' names it), e.g. \"lz4=ALTER DATABASE {database} SET wal_compression=lz4\"",
    )
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--max-messages", type=int, default=1000, help="flow control per stream")
    parser.add_argument("--out", default="docs/img/growth.png", help="the plot; data beside it")
    parser.add_argument(
        "--replot",
        nargs="+",
        metavar="JSON",
        help="measure nothing: merge earlier runs into one table and plot: every database "
        "named in --databases (variants by their full name) from every file holding it",
    )
    args = parser.parse_args(argv)
    if args.replot:
        return replot(args)
    args.sizes = sorted(int(size) for size in args.sizes.split(","))

    console = Console(width=160)
    started = dt.datetime.now(dt.UTC)
    results: list[dict[str, Any]] = []
    with emulator_process(startup_timeout=120) as address:  # a busy machine starts it slowly
        os.environ["PUBSUB_EMULATOR_HOST"] = address
        plan = [(name, "", "") for name in args.databases.split(",")]
        plan += [("postgresql", *variant.partition("=")[::2]) for variant in args.postgres_variant]
        for name, label, setup in plan:
            if name == "sqlite":
                table: Any = SQLiteTable(Path(tempfile.mkdtemp(prefix="mini-scan-growth-")))
            else:
                table = PostgresTable(args.postgres, label, setup)
            try:
                results += measure(table, args, console, results)
            finally:
                table.drop()
    with_ratios(results)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    title = (
        f"{args.count:,} messages per drain, processor at default settings; "
        f"{started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, load at the end {load}"
    )
    return report(results, args, title, console)


if __name__ == "__main__":
    raise SystemExit(main())
