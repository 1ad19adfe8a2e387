"""What one upserted row costs PostgreSQL at size: WAL bytes, full-page images, WAL records and
the HOT share, per row, through the repository's own statement, no Pub/Sub.

These are counts, not rates: a busy machine slows a drain but does not change what each row
writes. Run it against a PostgreSQL server nobody else writes to (the WAL counters are the
server's), e.g. a private one started for the purpose. Each variant is a fresh database
(set up with SQL after migrating, as bench/growth.py's --postgres-variant), preloaded with
--rows rows, then, after a checkpoint, --batches batches of 1,000 newer scans of random stored
keys (update) and of new keys between them (insert).

    nice -n 10 uv run python -m bench.walcost --postgres URL [--rows 2000000] \\
        [--variant "fillfactor 100=ALTER TABLE services SET (fillfactor = 100)"] ...
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.growth import PRELOADED_AGE_S, PostgresTable, key
from processor.schema import Observation
from processor.storage import Repository

BATCH = 1000


def _counters(table: PostgresTable) -> dict[str, float]:
    with table.engine.connect() as connection:
        connection.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
        wal = connection.exec_driver_sql(
            "SELECT wal_records, wal_fpi, wal_bytes FROM pg_stat_wal"
        ).one()
        updates, hot = connection.exec_driver_sql(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'services'"
        ).one()
    return {
        "records": wal[0],
        "fpi": wal[1],
        "bytes": float(wal[2]),
        "updates": updates,
        "hot": hot,
    }


def measure(table: PostgresTable, path: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(path)
    repository = Repository(table.engine)
    now = int(time.time())
    table._autocommit("CHECKPOINT")
    before = _counters(table)
    started = time.perf_counter()
    for _ in range(args.batches):
        if path == "update":
            slots = [2 * j for j in rng.sample(range(args.rows), BATCH)]
        else:
            slots = [2 * rng.randrange(args.rows) + 1 for _ in range(BATCH)]
        repository.upsert_many(
            Observation(*key(slot), now, f"service response: {rng.randrange(100)}")
            for slot in slots
        )
    elapsed = time.perf_counter() - started
    time.sleep(1)  # table statistics reach the cumulative view at most a second late
    after = _counters(table)
    rows = args.batches * BATCH
    delta = {name: after[name] - before[name] for name in after}
    return {
        "variant": table.name,
        "path": path,
        "wal_bytes": delta["bytes"] / rows,
        "fpi": delta["fpi"] / rows,
        "records": delta["records"] / rows,
        "hot": delta["hot"] / delta["updates"] if delta["updates"] else float("nan"),
        "rate": rows / elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", required=True, help="a server nobody else writes to")
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=SQL")
    args = parser.parse_args(argv)

    console = Console(width=140)
    stamp = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=PRELOADED_AGE_S)
    results = []
    for variant in args.variant or [""]:
        label, _, setup = variant.partition("=")
        table = PostgresTable(args.postgres, label, setup)
        try:
            table.preload(0, args.rows, stamp)
            for path in ("update", "insert"):
                results.append(measure(table, path, args))
                console.print(f"  {results[-1]}")
        finally:
            table.drop()
    report = Table(title=f"Per upserted row, table of {args.rows:,} rows, after a checkpoint")
    for column in ("variant", "path", "WAL B/row", "FPI/row", "records/row", "HOT", "rows/s"):
        report.add_column(column, justify="right")
    for r in results:
        report.add_row(
            r["variant"],
            r["path"],
            f"{r['wal_bytes']:,.0f}",
            f"{r['fpi']:.2f}",
            f"{r['records']:.2f}",
            f"{r['hot']:.0%}" if r["path"] == "update" else "",
            f"{r['rate']:,.0f}",
        )
    console.print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
