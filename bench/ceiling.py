"""Write ceilings: 1, 2 and 4 writer processes of upsert_many batches against one database.

Usage: uv run python -m bench.ceiling [--rows 20000] [--writers 1,2,4] [--rounds 3] [--postgres URL]

Each writer is its own process (as each processor is), with its own engine, and upserts batches of
500 through `Repository.upsert_many`, the processor's only write. All writers start together and
the total rate is every row over the wall time from the first start to the last finish. Rounds
interleave every configuration and each keeps its best round (a shared machine's noise only ever
slows a run down). Two workloads:

- new keys: each writer inserts rows no one else touches (a growing table of new services);
- shared keys: every writer updates the same keys with newer scans (row locks contend on
  PostgreSQL; every writer needs SQLite's single write lock either way).

PostgreSQL runs on the same machine as the writers, so both compete for the same cores: the
figures are a floor for a database on its own host. Prints one table; the load average is printed
before and after, since other work on the machine moves absolute figures.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from rich.console import Console
from rich.table import Table

from bench.pipeline import batches, observations
from processor.schema import Observation
from processor.storage import Repository, migrate, open_engine
from processor.storage.migrations import drop_schema

BATCH = 500
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/mini_scan_bench"


@dataclass
class Run:
    database: str
    workload: str
    writers: int
    rows: int
    seconds: float
    per_writer: list[float]


def workload_rows(workload: str, writer: int, rows: int) -> list[Observation]:
    if workload == "new keys":  # disjoint addresses per writer: 10.<writer>.x.y
        return [
            o._replace(ip=f"10.{writer}.{i >> 8 & 255}.{i & 255}", port=i >> 16)
            for i, o in enumerate(observations(rows, seed=writer))
        ]
    # The same keys for every writer, each scan newer than the table's (so every row updates).
    base = observations(rows, seed=0)
    return [o._replace(timestamp=o.timestamp + 1 + writer) for o in base]


def writer_main(url: str, rows: list[Observation], start: object, results: object) -> None:
    engine = open_engine(url)
    repository = Repository(engine)
    parts = batches(rows, BATCH)
    start.wait()  # type: ignore[attr-defined]
    began = time.time()
    for part in parts:
        repository.upsert_many(part)
    results.put((began, time.time(), len(rows)))  # type: ignore[attr-defined]
    engine.dispose()


def reset(url: str) -> None:
    engine = open_engine(url)
    drop_schema(engine)
    migrate(engine)
    engine.dispose()


def measure(url: str, database: str, workload: str, writers: int, rows: int) -> Run:
    reset(url)
    if workload == "shared keys":  # the keys exist first: the timed run is all updates
        Repository(open_engine(url)).upsert_many(workload_rows(workload, -1, rows))
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    children = [
        context.Process(
            target=writer_main, args=(url, workload_rows(workload, w, rows), start, results)
        )
        for w in range(writers)
    ]
    for child in children:
        child.start()
    time.sleep(2)  # let every child import and connect before the start
    start.set()
    finished = [results.get(timeout=600) for _ in children]
    for child in children:
        child.join()
    seconds = max(end for _, end, _ in finished) - min(began for began, _, _ in finished)
    return Run(
        database,
        workload,
        writers,
        sum(n for *_, n in finished),
        seconds,
        [n / (end - began) for began, end, n in finished],
    )


def ensure_database(url: str) -> None:
    """Creates the benchmark's own database, so it never touches the tests' one."""
    target = psycopg.conninfo.conninfo_to_dict(url.replace("+psycopg", ""))
    name = target.pop("dbname")
    with psycopg.connect(**target, dbname="postgres", autocommit=True) as connection:
        if not connection.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
        ).fetchone():
            connection.execute(f'CREATE DATABASE "{name}"')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000, help="rows per writer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--writers", default="1,2,4")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES)
    args = parser.parse_args()
    counts = [int(n) for n in args.writers.split(",")]

    console = Console(width=120)
    console.print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    ensure_database(args.postgres)
    sqlite_url = f"sqlite:///{Path(tempfile.mkdtemp(prefix='mini-scan-ceiling-')) / 'c.db'}"
    best: dict[tuple[str, str, int], Run] = {}
    for _ in range(args.rounds):
        for database, url in (("sqlite", sqlite_url), ("postgresql", args.postgres)):
            for workload in ("new keys", "shared keys"):
                for writers in counts:
                    run = measure(url, database, workload, writers, args.rows)
                    key = (database, workload, writers)
                    if key not in best or run.seconds < best[key].seconds:
                        best[key] = run
    runs = list(best.values())

    table = Table(
        title=f"upsert_many, batch {BATCH}, {args.rows:,} rows per writer process, "
        f"best of {args.rounds} rounds"
    )
    columns = ("database", "workload", "writers", "rows/s total", "per writer, mean", "slowest")
    for column in (*columns, "x 1 writer"):
        table.add_column(column, justify="right")
    single = {(r.database, r.workload): r.rows / r.seconds for r in runs if r.writers == 1}
    for run in runs:
        total = run.rows / run.seconds
        base = single.get((run.database, run.workload))
        table.add_row(
            run.database,
            run.workload,
            str(run.writers),
            f"{total:,.0f}",
            f"{total / run.writers:,.0f}",
            f"{min(run.per_writer):,.0f}",
            f"{total / base:.2f}" if base else "-",
        )
    console.print(table)
    console.print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
