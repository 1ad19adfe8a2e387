"""What one upserted row costs SQLite at size: pages read, WAL frames and bytes, bytes written,
checkpoints, fsyncs and CPU per row, through the repository's own statement, no Pub/Sub.

These are counts, not rates: a busy machine slows a drain but hardly changes what each row
reads and writes (the rate is printed too; it is only as good as the machine is quiet). A table
of --rows rows is preloaded once (as bench/growth.py preloads it) and kept in --cache, one file
per size, page size and schema revision, so later runs start from a copy. Each variant runs on
a fresh copy, in a child process: --warmup batches (not counted: they fill the page cache, as a
long-running processor's is), then --batches batches of --batch newer scans of random stored
keys (update), then as many of new keys between them (insert).

    nice -n 10 uv run python -m bench.sqlitecost [--rows 20000000] [--batch 1000]
        [--variant "autocheckpoint 10000=PRAGMA wal_autocheckpoint=10000"] ...

A variant is NAME=SQL run on each connection the engine opens, after the processor's own
pragmas; without one, the processor's settings alone. Pages read are read() calls on the
database and WAL files over the page size: B-tree pages missing from SQLite's cache plus the
checkpoint's reads of WAL frames (pages read through `mmap_size` are not counted). WAL frames
come from the wal-index header after each commit; written bytes are every write() of the
process (WAL, checkpoint). fsyncs are counted with `perf stat` where the kernel lets it trace
system calls (else left blank).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import resource
import shutil
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from bench.growth import PRELOADED_AGE_S, SQLiteTable, key
from processor.schema import Observation
from processor.storage import Repository, open_engine

PATHS = ("update", "insert")
_FSYNC_EVENTS = "syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync"


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    from processor.storage.migrations import _MIGRATIONS

    return str(ScriptDirectory(str(_MIGRATIONS)).get_current_head())


def preloaded(rows: int, page_size: int, cache: Path, console: Console) -> Path:
    """A database file at the newest schema holding `rows` stored rows (slots 0, 2, 4, ...),
    made once per size, page size and revision and reused."""
    path = cache / f"services-{head_revision()}-{rows}-{page_size}.db"
    if not path.exists():
        started = time.perf_counter()
        workdir = Path(tempfile.mkdtemp(prefix="preload-", dir=cache))
        with sqlite3.connect(workdir / "growth.db") as connection:  # before anything is written
            connection.execute(f"PRAGMA page_size={page_size:d}")
            connection.execute("PRAGMA journal_mode=WAL")
        table = SQLiteTable(workdir)
        stamp = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=PRELOADED_AGE_S)
        if rows:
            table.preload(0, rows, stamp)
        table.path.rename(path)
        shutil.rmtree(workdir)
        console.print(f"  preloaded {rows:,} rows in {time.perf_counter() - started:.0f} s")
    return path


def shape(path: Path) -> dict[str, Any]:
    """The B-trees of `services`: depth, leaf pages, how full the leaves are."""
    connection = sqlite3.connect(path)
    try:
        trees = connection.execute(
            "SELECT name, max(length(path) - length(replace(path, '/', ''))), "
            "sum(pagetype = 'leaf'), sum(pgsize - unused) * 1.0 / sum(pgsize) "
            "FROM dbstat WHERE pagetype = 'leaf' OR pagetype = 'internal' GROUP BY name"
        ).fetchall()
        page_size = connection.execute("PRAGMA page_size").fetchone()[0]
    finally:
        connection.close()
    return {
        "page_size": page_size,
        "trees": {
            name: {"depth": depth + 1, "leaves": leaves, "fill": fill}
            for name, depth, leaves, fill in trees
            if "services" in name
        },
    }


def _wal_state(shm: Path) -> tuple[int, bytes]:
    """(frames in the WAL, its salt): mxFrame and aSalt of the wal-index header. A checkpoint
    that emptied the WAL lets the next writer restart it from frame 0 with a new salt."""
    with shm.open("rb") as f:
        header = f.read(40)
    return struct.unpack_from("=I", header, 16)[0], header[32:40]


def _io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _batch(kind: str, stored: int, size: int, rng: random.Random) -> list[Observation]:
    """Newer scans of random stored keys (update) or new keys between them (insert)."""
    if kind == "update":
        slots = [2 * j for j in rng.sample(range(max(stored, 1)), size)]
    else:
        slots = [2 * rng.randrange(max(stored, size * 10)) + 1 for _ in range(size)]
    now = int(time.time())
    return [
        Observation(*key(slot), now, f"service response: {rng.randrange(100)}") for slot in slots
    ]


def run_variant(path: Path, setup: str, args: argparse.Namespace) -> dict[str, Any]:
    """The counted batches on the database at `path` (in this process)."""
    engine = open_engine(f"sqlite:///{path}")

    @sa.event.listens_for(engine, "connect")
    def _variant(dbapi_connection: Any, _record: Any) -> None:
        for statement in filter(None, (s.strip() for s in setup.split(";"))):
            dbapi_connection.execute(statement)

    repository = Repository(engine)
    with engine.connect() as connection:
        stored = connection.exec_driver_sql("SELECT count(*) FROM services").scalar() or 0
        page_size = connection.exec_driver_sql("PRAGMA page_size").scalar()
    rng = random.Random(19)
    shm = Path(f"{path}-shm")
    results = {}
    for kind in PATHS:
        frames = checkpoints = 0
        for number in range(args.warmup + args.batches):
            if number == args.warmup:  # the counted batches start
                io, usage, started = _io(), _cpu(), time.perf_counter()
                frames = checkpoints = 0
            batch = _batch(kind, stored, args.batch, rng)
            before, salt = _wal_state(shm)
            repository.upsert_many(batch)
            after, new_salt = _wal_state(shm)
            restarted = new_salt != salt  # a checkpoint emptied the WAL: this commit from 0
            frames += after if restarted else after - before
            checkpoints += restarted
        elapsed = time.perf_counter() - started
        rows = args.batches * args.batch
        end = _io()
        results[kind] = {
            "pages_read": (end["rchar"] - io["rchar"]) / page_size / rows,
            "wal_frames": frames / rows,
            "wal_bytes": frames * (page_size + 24) / rows,
            "checkpoints_per_batch": checkpoints / args.batches,
            "written_bytes": (end["wchar"] - io["wchar"]) / rows,
            "cpu_us": (_cpu() - usage) * 1e6 / rows,
            "rate": rows / elapsed,
        }
    engine.dispose()
    return results


def _child(args: argparse.Namespace) -> int:
    results = run_variant(Path(args.child), args.setup, args)
    Path(args.child + ".json").write_text(json.dumps(results))
    return 0


def measure(source: Path, label: str, setup: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Copy the preloaded file and run the variant in a child (under perf stat when it can
    count fsyncs); every result a row."""
    workdir = Path(tempfile.mkdtemp(prefix="cost-", dir=args.cache))
    try:
        path = workdir / "services.db"
        shutil.copyfile(source, path)
        command = [sys.executable, "-m", "bench.sqlitecost", "--child", str(path), "--setup", setup]
        for option in ("batch", "batches", "warmup"):
            command += [f"--{option}", str(getattr(args, option))]
        counts = workdir / "perf.csv"
        perf = shutil.which("perf")
        if perf:
            command = [perf, "stat", "-x,", "-o", str(counts), "-e", _FSYNC_EVENTS, *command]
        subprocess.run(command, check=True)
        results = json.loads(Path(f"{path}.json").read_text())
        fsyncs = _fsyncs(counts) if perf else None
        rows = 2 * (args.warmup + args.batches)  # batches in the child, both paths
        return [
            {
                "variant": label,
                "path": kind,
                **results[kind],
                "fsyncs_per_batch": fsyncs and fsyncs / rows,
            }
            for kind in PATHS
        ]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _fsyncs(counts: Path) -> int | None:
    total = 0
    for line in counts.read_text().splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2].startswith("syscalls:"):
            if not fields[0].isdigit():
                return None  # not supported here
            total += int(fields[0])
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000_000)
    parser.add_argument("--batch", type=int, default=1000, help="rows per batch (processor: 1,000)")
    parser.add_argument("--batches", type=int, default=20, help="counted batches per path")
    parser.add_argument("--warmup", type=int, default=5, help="uncounted batches per path first")
    parser.add_argument("--page-size", type=int, default=4096, help="of the preloaded file")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=SQL")
    parser.add_argument("--cache", default="/tmp/mini-scan-preload", help="preloaded files")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--setup", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)
    if args.rows < args.batch:
        parser.error("--rows must hold at least one batch of stored keys to update")

    console = Console(width=160)
    args.cache = Path(args.cache)
    args.cache.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    source = preloaded(args.rows, args.page_size, args.cache, console)
    saved = source.with_suffix(".shape.json")  # dbstat reads the whole file: once per file
    if not saved.exists():
        saved.write_text(json.dumps(shape(source)))
    tree = json.loads(saved.read_text())
    console.print(f"  preloaded table: {json.dumps(tree)}")
    results = []
    for variant in args.variant or ["processor defaults="]:
        label, _, setup = variant.partition("=")
        results += measure(source, label, setup, args)
        console.print(f"  {results[-2]}\n  {results[-1]}")
    title = (
        f"SQLite per upserted row: {args.rows:,} rows, schema {head_revision()}, "
        f"page {tree['page_size']} B, batches of {args.batch:,}; "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, load {load:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    report = Table(title=title)
    columns = (
        "variant",
        "path",
        "pages read",
        "WAL frames",
        "WAL B",
        "written B",
        "checkpoints/batch",
        "fsyncs/batch",
        "CPU µs",
        "rows/s",
    )
    for column in columns:
        report.add_column(column, justify="right")
    for r in results:
        report.add_row(
            r["variant"],
            r["path"],
            f"{r['pages_read']:.2f}",
            f"{r['wal_frames']:.2f}",
            f"{r['wal_bytes']:,.0f}",
            f"{r['written_bytes']:,.0f}",
            f"{r['checkpoints_per_batch']:.2f}",
            "" if r["fsyncs_per_batch"] is None else f"{r['fsyncs_per_batch']:.1f}",
            f"{r['cpu_us']:.0f}",
            f"{r['rate']:,.0f}",
        )
    console.print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
