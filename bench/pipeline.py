"""Decode and storage throughput, beside the raw driver's executemany for the same rows.

Usage: uv run python bench/pipeline.py [--rows 20000] [--postgres URL] [--sqlite-dir DIR]

Prints one table. Every figure in a row comes from the same run, so ratios are meaningful even
on a noisy machine; absolute figures are not.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psycopg
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from processor.schema import Observation, decode, encode
from processor.storage import Repository, migrate, open_engine
from processor.storage.migrations import drop_schema

BATCH_SIZES = (1, 100, 500, 2000)
RAW_INSERT = (
    "INSERT INTO raw_services (ip, port, service, last_scanned, response, first_seen, updated_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def observations(count: int, seed: int = 1) -> list[Observation]:
    """Distinct keys (the insert path), shaped like the reference scanner's messages."""
    rng = random.Random(seed)
    now = int(time.time())
    return [
        Observation(
            f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
            rng.randrange(65535),
            rng.choice(("HTTP", "SSH", "DNS")),
            now - rng.randrange(86400),
            f"service response: {rng.randrange(100)}",
        )
        for i in range(count)
    ]


def rate(count: int, run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return count / (time.perf_counter() - start)


def batches(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def raw_rows(obs: Sequence[Observation]) -> list[tuple]:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    return [(o.ip, o.port, o.service, stamp, o.response, stamp, stamp) for o in obs]


def bench_repository(url: str, obs: list[Observation], size: int) -> float:
    engine = open_engine(url)
    drop_schema(engine)
    migrate(engine)
    repository = Repository(engine)
    parts = batches(obs, size)
    result = rate(len(obs), lambda: [repository.upsert_many(part) for part in parts])
    engine.dispose()
    return result


def bench_raw_sqlite(path: str, obs: list[Observation], size: int) -> float:
    connection = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=30000"):
        connection.execute(f"PRAGMA {pragma}")
    connection.execute("DROP TABLE IF EXISTS raw_services")
    connection.execute(
        "CREATE TABLE raw_services (ip TEXT, port INTEGER, service TEXT, last_scanned TEXT,"
        " response TEXT, first_seen TEXT, updated_at TEXT, PRIMARY KEY (ip, port, service))"
    )
    parts = [raw_rows(part) for part in batches(obs, size)]
    insert = RAW_INSERT

    def run() -> None:
        for part in parts:
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(insert, part)
            connection.execute("COMMIT")

    result = rate(len(obs), run)
    connection.close()
    return result


def bench_raw_postgres(url: str, obs: list[Observation], size: int) -> float:
    conninfo = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo) as connection:
        connection.execute("DROP TABLE IF EXISTS raw_services")
        connection.execute(
            "CREATE TABLE raw_services (ip varchar(45), port integer, service varchar(64),"
            ' last_scanned timestamptz, response text COLLATE "C", first_seen timestamptz,'
            " updated_at timestamptz, PRIMARY KEY (ip, port, service))"
        )
        connection.commit()
        parts = [raw_rows(part) for part in batches(obs, size)]
        insert = RAW_INSERT.replace("?", "%s")

        def run() -> None:
            for part in parts:
                with connection.cursor() as cursor:
                    cursor.executemany(insert, part)
                connection.commit()

        result = rate(len(obs), run)
        connection.execute("DROP TABLE raw_services")
        connection.commit()
    return result


def bench_decode(messages: list[bytes]) -> float:
    return rate(len(messages), lambda: [decode(m) for m in messages])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument(
        "--postgres",
        default=os.environ.get("TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1/test"),
    )
    parser.add_argument(
        "--sqlite-dir", default=None, help="where the SQLite file goes (a temp dir)"
    )
    args = parser.parse_args()

    obs = observations(args.rows)
    messages = [encode(o, 1 + i % 2) for i, o in enumerate(obs)]
    console = Console()
    console.print(f"decode (mixed v1/v2): {bench_decode(messages):,.0f} msg/s")

    workdir = Path(args.sqlite_dir or tempfile.mkdtemp(prefix="mini-scan-bench-"))
    sqlite_url = f"sqlite:///{workdir / 'bench.db'}"
    table = Table(title=f"upsert_many vs raw executemany, distinct keys, {args.rows:,} rows max")
    for column in ("database", "batch", "rows", "upsert_many rows/s", "raw rows/s", "ratio"):
        table.add_column(column, justify="right")
    for size in BATCH_SIZES:
        # Batch 1 commits (and fsyncs) every row: a smaller sample keeps the run short.
        sample = obs[: min(args.rows, size * 400)]
        ours = bench_repository(sqlite_url, sample, size)
        raw = bench_raw_sqlite(str(workdir / "raw.db"), sample, size)
        table.add_row(
            "sqlite",
            str(size),
            f"{len(sample):,}",
            f"{ours:,.0f}",
            f"{raw:,.0f}",
            f"{ours / raw:.0%}",
        )
        ours = bench_repository(args.postgres, sample, size)
        raw = bench_raw_postgres(args.postgres, sample, size)
        table.add_row(
            "postgresql",
            str(size),
            f"{len(sample):,}",
            f"{ours:,.0f}",
            f"{raw:,.0f}",
            f"{ours / raw:.0%}",
        )
    console.print(table)

    engine = open_engine(sqlite_url)
    repository = Repository(engine)
    parts = batches(messages, 500)

    def decode_and_store() -> None:
        for part in parts:
            repository.upsert_many([decode(m) for m in part])

    with engine.begin() as connection:
        connection.exec_driver_sql("DELETE FROM services")
    console.print(
        f"decode + upsert_many, batch 500, SQLite: "
        f"{rate(len(messages), decode_and_store):,.0f} msg/s"
    )


if __name__ == "__main__":
    main()
