"""Soak: the scanner publishing at a steady rate for minutes, two processors on PostgreSQL, our
emulator in a process of its own; RSS must stay flat and the table must end at the oracle.

Every --interval seconds a line: elapsed, published, committed (sum of the processors'
`mini_scan_messages_acked_total`), backlog (published - acked), p50 publish-to-commit lag over
the interval, each processor's RSS, warnings and errors in their logs. At the end a table of
totals, msg/s and RSS start/end/max per processor, and the oracle check (the scanner's --log
against the table).

    uv run python -m bench.soak [--duration 600] [--rate 5000] [--postgres URL]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from emulator.testing import emulator_process, free_port, wait_until
from processor.commands.setup import ensure_resources
from processor.config import SetupSettings
from processor.runtime.metrics import scrape
from processor.schema import Observation
from processor.storage import Repository, open_engine

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
MB = 1024 * 1024


@dataclass
class Child:
    """A processor process, its metrics port, its log and what was seen of them."""

    name: str
    process: subprocess.Popen[bytes]
    metrics_port: int
    log_path: Path
    rss: list[float] = field(default_factory=list)
    acked: float = 0.0
    warnings: int = 0
    errors: int = 0
    _offset: int = 0

    def sample_rss(self) -> float:
        mb = psutil.Process(self.process.pid).memory_info().rss / MB
        self.rss.append(mb)
        return mb

    def scan_log(self) -> None:
        """Count warnings and errors among the log lines written since the last call."""
        with self.log_path.open("rb") as log:
            log.seek(self._offset)
            chunk = log.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for line in complete.splitlines():
            level = _level(line)
            self.warnings += level == "warning"
            self.errors += level in ("error", "critical", "exception")


def _level(line: bytes) -> str:
    if not line.startswith(b"{"):
        return "error" if b"Traceback" in line else ""
    try:
        return str(json.loads(line).get("level", ""))
    except ValueError:
        return ""


def metrics(port: int) -> dict[str, float]:
    """Every sample on a processor's /metrics, by its full name with labels."""
    return scrape(port)


def lag_p50(before: dict[str, float], after: dict[str, float]) -> float | None:
    """The median publish-to-commit lag over an interval, from the histogram's bucket deltas."""
    prefix = "mini_scan_publish_to_commit_seconds_bucket{le="
    buckets = sorted(
        (float(name[len(prefix) :].strip('}"')), after[name] - before.get(name, 0.0))
        for name in after
        if name.startswith(prefix)
    )
    if not buckets or buckets[-1][1] <= 0:
        return None
    half = buckets[-1][1] / 2
    return next(bound for bound, count in buckets if count >= half)


class LineCounter:
    """Counts the lines of a file that another process is still appending to."""

    def __init__(self, path: Path) -> None:
        self._path, self._offset, self.lines = path, 0, 0

    def update(self) -> int:
        if self._path.exists():
            with self._path.open("rb") as file:
                file.seek(self._offset)
                chunk = file.read()
            self._offset += len(chunk)
            self.lines += chunk.count(b"\n")
        return self.lines


def create_database(admin_url: str) -> tuple[str, sa.Engine]:
    """A fresh database for this run on the PostgreSQL server (dropped at the end)."""
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"mini_scan_soak_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    return url, admin


def drop_database(admin: sa.Engine, url: str) -> None:
    """Drop the database `create_database` made."""
    with admin.connect() as connection:
        name = sa.make_url(url).database
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def create_resources(prefix: str) -> dict[str, str]:
    """A fresh topic, subscription, dead-letter topic and subscription: their settings."""
    run = uuid.uuid4().hex[:8]
    names = {
        "pubsub_topic": f"{prefix}-{run}",
        "pubsub_subscription": f"{prefix}-sub-{run}",
        "pubsub_dead_letter_topic": f"{prefix}-dlq-{run}",
        "pubsub_dead_letter_subscription": f"{prefix}-dlq-sub-{run}",
    }
    ensure_resources(SetupSettings(**names))
    return names


def wait_ready(child: Child) -> None:
    ready = wait_until(lambda: metrics(child.metrics_port), timeout=60, interval=0.2)
    assert ready, child.log_path.read_text()[-2000:]


def spawn_processor(name: str, names: dict[str, str], url: str, workdir: Path) -> Child:
    port = free_port()
    log_path = workdir / f"{name}.log"
    env = os.environ | {k.upper(): v for k, v in names.items()}
    env |= {"DATABASE_URL": url, "METRICS_PORT": str(port), "LOG_FORMAT": "json"}
    log: IO[bytes] = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "processor"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    return Child(name, process, port, log_path)


def start_scanner(args: argparse.Namespace, names: dict[str, str], log: Path) -> subprocess.Popen:
    env = os.environ | {"PUBSUB_TOPIC": names["pubsub_topic"], "LOG_FORMAT": "json"}
    command = [sys.executable, "-m", "scanner", "--rate", str(args.rate)]
    command += ["--count", str(int(args.rate * args.duration)), "--seed", str(args.seed)]
    command += ["--keys", str(args.keys), "--duplicates", "0.1", "--out-of-order", "0.1"]
    command += ["--log", str(log)]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=(log.parent / "scanner.err").open("wb")
    )


def oracle_check(log: Path, url: str) -> tuple[bool, int, int]:
    """(table equals the merge rule over every confirmed valid scan, expected rows, stored)."""
    from processor.tests.helpers.oracle import expected_rows, stored_rows

    observations = []
    with log.open() as lines:
        for line in lines:
            record = json.loads(line)
            if "response" in record:
                observations.append(
                    Observation(
                        record["ip"],
                        record["port"],
                        record["service"],
                        record["timestamp"],
                        record["response"],
                    )
                )
    expected = expected_rows(observations)
    repository = Repository(open_engine(url))
    stored = stored_rows(repository.rows())
    repository.engine.dispose()
    return stored == expected, len(expected), len(stored)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of publishing")
    parser.add_argument("--rate", type=float, default=5000.0, help="scanner messages/s")
    parser.add_argument("--processors", type=int, default=2)
    parser.add_argument("--keys", type=int, default=20_000, help="distinct keys scanned")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between lines")
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="PostgreSQL server URL")
    args = parser.parse_args(argv)
    console = Console(width=160)
    url, admin = create_database(args.postgres)
    workdir = Path(tempfile.mkdtemp(prefix="mini-scan-soak-"))
    try:
        with emulator_process() as address:
            os.environ["PUBSUB_EMULATOR_HOST"] = address
            return soak(args, url, workdir, console)
    finally:
        drop_database(admin, url)


def soak(args: argparse.Namespace, url: str, workdir: Path, console: Console) -> int:
    names = create_resources("soak")
    children = [
        spawn_processor(f"processor-{i}", names, url, workdir) for i in range(args.processors)
    ]
    for child in children:
        wait_ready(child)
        child.sample_rss()
    log = workdir / "scanner.jsonl"
    console.print(
        f"soak: {args.rate:,.0f} msg/s for {args.duration:,.0f} s, {args.processors} "
        f"processors on PostgreSQL, logs in {workdir}"
    )
    published = LineCounter(log)
    scanner = start_scanner(args, names, log)
    started = time.monotonic()
    previous = [metrics(c.metrics_port) for c in children]
    max_backlog = 0.0

    def line(label: str) -> float:
        nonlocal previous, max_backlog
        current = [metrics(c.metrics_port) for c in children]
        acked = sum(m.get("mini_scan_messages_acked_total", 0.0) for m in current)
        backlog = published.update() - acked
        max_backlog = max(max_backlog, backlog)
        lags = [lag_p50(p, c) for p, c in zip(previous, current, strict=True)]
        lag = max((x for x in lags if x is not None), default=None)
        previous = current
        parts = []
        for child, sample in zip(children, current, strict=True):
            child.acked = sample.get("mini_scan_messages_acked_total", child.acked)
            child.scan_log()
            parts.append(
                f"{child.name} {child.sample_rss():.0f} MB w{child.warnings} e{child.errors}"
            )
        p50 = f"{lag:.2f}s" if lag is not None else "-"
        console.print(
            f"{label} {time.monotonic() - started:6.0f}s  published {published.lines:>9,}  "
            f"committed {acked:>9,.0f}  backlog {backlog:>7,.0f}  p50 lag {p50:>6}  "
            + "  ".join(parts)
        )
        return acked

    while scanner.poll() is None:
        time.sleep(args.interval)  # the reporting period
        line("  ")
    publish_seconds = time.monotonic() - started
    total = published.update()
    # Drain: the processors finish what is left, then stop on SIGTERM.
    drained = wait_until(lambda: line("d ") >= total, timeout=300, interval=args.interval)
    drain_seconds = time.monotonic() - started - publish_seconds
    for child in children:
        child.process.send_signal(signal.SIGTERM)
    codes = [child.process.wait(timeout=60) for child in children]
    for child in children:
        child.scan_log()
    matches, expected, stored = oracle_check(log, url)
    report(console, args, children, codes, total, publish_seconds, drain_seconds, max_backlog)
    verdict = "equal" if matches else "DIFFERENT"
    console.print(
        f"scanner exit {scanner.returncode}; drained: {drained}; oracle: table {verdict} "
        f"({stored:,} rows stored, {expected:,} expected)"
    )
    return 0 if matches and drained and scanner.returncode == 0 and codes == [0] * len(codes) else 1


def report(
    console: Console,
    args: argparse.Namespace,
    children: list[Child],
    codes: list[int],
    total: int,
    publish_seconds: float,
    drain_seconds: float,
    max_backlog: float,
) -> None:
    console.print(
        f"published {total:,} in {publish_seconds:.0f} s = {total / publish_seconds:,.0f} msg/s "
        f"(asked {args.rate:,.0f}); drained {drain_seconds:.0f} s after; "
        f"max backlog {max_backlog:,.0f}"
    )
    table = Table(title="Soak: processors")
    for column in (
        "processor",
        "acked",
        "RSS start MB",
        "RSS end MB",
        "RSS max MB",
        "warnings",
        "errors",
        "exit",
    ):
        table.add_column(column, justify="right")
    for child, code in zip(children, codes, strict=True):
        table.add_row(
            child.name,
            f"{child.acked:,.0f}",
            f"{child.rss[0]:.0f}",
            f"{child.rss[-1]:.0f}",
            f"{max(child.rss):.0f}",
            str(child.warnings),
            str(child.errors),
            str(code),
        )
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
