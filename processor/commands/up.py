"""`mini-scan up`: the whole pipeline on one machine with nothing but Python.

Uses PUBSUB_EMULATOR_HOST if set, otherwise starts the project's emulator in-process; creates
the topics and subscriptions; runs the scanner and N processors as child processes (logs in
data/logs/); shows a live view; on Ctrl-C (or SIGTERM, or --duration) stops the scanner, then
the processors (each flushes and acks what it holds), and prints a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from pydantic import model_validator
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from emulator import Emulator
from processor.commands import run_command
from processor.commands.inert import cell
from processor.commands.query import read_engine
from processor.commands.setup import ensure_resources
from processor.config import (
    ArgumentParser,
    DatabaseSettings,
    PubSubSettings,
    SetupSettings,
    add_arguments,
    default_project,
    load,
)
from processor.errors import ConfigError, QueryError, StartupError, first_line
from processor.runtime.logs import redact_url
from processor.runtime.metrics import scrape
from processor.stopping import Stopped, stop_on_signals

_CHILD_GRACE = 15.0  # a processor's own grace is 10 s


class UpSettings(PubSubSettings, DatabaseSettings):
    @model_validator(mode="after")
    def _project(self) -> UpSettings:  # replaces PubSubSettings's: `up` always has an emulator
        if self.pubsub_project_id is None:
            self.pubsub_project_id = default_project(emulator_host="started by up")
        return self


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    metrics_port: int | None = None
    stats: dict[str, float] = field(default_factory=dict)
    rate: float = 0.0

    @property
    def state(self) -> str:
        code = self.process.poll()
        if code is not None:
            return f"exited {code}"
        return "ready" if self.stats.get("mini_scan_ready") == 1 else "starting"


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Run emulator, setup, scanner and processors.")
    parser.add_argument("--processors", type=int, default=2, help="processor processes (2)")
    parser.add_argument("--rate", type=float, default=100.0, help="scanner messages/s (100)")
    parser.add_argument("--duration", type=float, default=None, help="stop after N seconds")
    parser.add_argument("--logs", type=Path, default=Path("data/logs"), help="child logs here")
    add_arguments(parser, UpSettings)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(_parser(), _up, argv)


def _up(args: argparse.Namespace) -> int:
    settings = load(UpSettings, args)
    if args.processors < 1 or args.rate < 0:
        raise ConfigError("--processors must be at least 1 and --rate not negative")
    console = Console()
    with contextlib.ExitStack() as stack:
        stop = stack.enter_context(stop_on_signals())
        host = settings.pubsub_emulator_host or os.environ.get("PUBSUB_EMULATOR_HOST")
        if not host:
            emulator = Emulator(port=0).start()
            stack.callback(emulator.stop)
            host = emulator.address
        os.environ["PUBSUB_EMULATOR_HOST"] = host
        # Registered before the first spawn: whatever happens from here (a stop, a failed
        # spawn), every child started so far is stopped, not left behind in its own session.
        children: list[Child] = []
        stack.callback(_stop_children, children)
        view = _View(settings, host, children, args.logs)  # counts the rows there before
        try:
            setup = SetupSettings(**settings.model_dump(include=set(PubSubSettings.model_fields)))
            ensure_resources(setup, stop)
            _spawn_all(children, args, _environment(settings, host), stop)
        except Stopped as exc:  # a stop is this command's normal end, before start-up too
            console.print(cell(exc))
            return 0
        except OSError as exc:  # a child that cannot be started
            raise StartupError(first_line(exc)) from exc
        started = time.monotonic()
        with Live(console=console, refresh_per_second=4, transient=False) as live:
            while not stop.wait(0.5):
                live.update(view.render(time.monotonic() - started))
                if args.duration and time.monotonic() - started >= args.duration:
                    break
                if any(c.process.poll() is not None for c in children):
                    break
            live.update(view.render(time.monotonic() - started, stopping=True))
        codes = _stop_children(children)
        console.print(cell(view.summary(time.monotonic() - started, codes)))
    return 0 if all(code == 0 for code in codes.values()) else 1


def _environment(settings: UpSettings, host: str) -> dict[str, str]:
    """The children's environment: the caller's (so `CONSUMER=client mini-scan up` runs the
    client consumer, and every other setting reaches them too), with up's own flags on top."""
    values = {
        k.upper(): str(v)
        for k, v in settings.model_dump(include=set(PubSubSettings.model_fields)).items()
        if v is not None
    }
    inherited = {
        k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DATABASE_URL_FILE")
    }
    values |= settings.database_environment()
    return inherited | values | {"PUBSUB_EMULATOR_HOST": host, "LOG_FORMAT": "json"}


def _spawn_all(
    children: list[Child], args: argparse.Namespace, env: dict[str, str], stop: threading.Event
) -> None:
    """The scanner, then the processors, each appended to `children` as it starts; raises
    `Stopped` if a stop comes first (the caller stops those already running)."""
    args.logs.mkdir(parents=True, exist_ok=True)
    plan = [("scanner", ["scanner", "--rate", str(args.rate), "--progress-every", "1"], None)]
    plan += [(f"processor-{i + 1}", ["processor"], _free_port()) for i in range(args.processors)]
    for name, module, metrics_port in plan:
        if stop.is_set():
            raise Stopped(f"stopped before {name} was started")
        children.append(_spawn(name, module, env, args.logs, metrics_port))


def _spawn(
    name: str, module: list[str], env: dict[str, str], logs: Path, metrics_port: int | None = None
) -> Child:
    child_env = env | ({"METRICS_PORT": str(metrics_port)} if metrics_port else {})
    with open(logs / f"{name}.log", "ab") as log:  # the child keeps its own copy
        process = subprocess.Popen(
            [sys.executable, "-m", *module],
            env=child_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us only: we stop the children in order
        )
    return Child(name, process, metrics_port)


def _stop_children(children: list[Child]) -> dict[str, int]:
    """Scanner first, then processors (each flushes what it holds); kill what outlives the grace."""
    codes: dict[str, int] = {}
    for group in (
        [c for c in children if c.metrics_port is None],
        [c for c in children if c.metrics_port],
    ):
        for child in group:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + _CHILD_GRACE
        for child in group:
            try:
                codes[child.name] = child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                codes[child.name] = child.process.wait()
    return codes


class _View:
    def __init__(self, settings: UpSettings, host: str, children: list[Child], logs: Path) -> None:
        self._settings, self._host, self._children = settings, host, children
        self._scanner_log = logs / "scanner.log"
        self._published = self._rows = 0
        self._checked_at = time.monotonic()
        self._reader: sa.Engine | None = None
        self._rows_before = self._count_rows()  # a database kept from an earlier run

    def render(self, elapsed: float, stopping: bool = False) -> Group:
        now = time.monotonic()
        interval = max(now - self._checked_at, 1e-3)
        for child in self._children:
            if child.metrics_port:
                before = child.stats.get("mini_scan_messages_acked_total", 0.0)
                child.stats = _scrape(child.metrics_port) or child.stats
                child.rate = (
                    child.stats.get("mini_scan_messages_acked_total", 0.0) - before
                ) / interval
        self._checked_at = now
        processed = self._total("mini_scan_messages_acked_total")
        dead = self._total("mini_scan_messages_dead_lettered_total")
        self._published = max(self._published, _scanner_confirmed(self._scanner_log))
        self._rows = self._count_rows()
        totals = Table.grid(padding=(0, 3))
        for column in ("published", "processed", "rate msg/s", "backlog", "rows", "dead-lettered"):
            totals.add_column(column, justify="right")
        totals.add_row("published", "processed", "rate msg/s", "backlog", "rows", "dead-lettered")
        totals.add_row(
            f"{self._published:,}",
            f"{processed:,.0f}",
            f"{sum(c.rate for c in self._children):,.0f}",
            f"{max(0, self._published - processed):,.0f}",
            f"{self._rows:,}",
            f"{dead:,.0f}",
        )
        per = Table(title=None, expand=False)
        for column in ("processor", "pid", "state", "acked", "msg/s", "held", "database"):
            per.add_column(column, justify="right")
        for child in self._children[1:]:
            s = child.stats
            per.add_row(
                child.name,
                str(child.process.pid),
                child.state,
                f"{s.get('mini_scan_messages_acked_total', 0):,.0f}",
                f"{child.rate:,.0f}",
                f"{s.get('mini_scan_messages_held', 0):,.0f}",
                "up" if s.get("mini_scan_database_up", 1) == 1 else "DOWN",
            )
        # Text, not markup: a path or host with "[" in it is shown, not parsed.
        header = cell(
            f"mini-scan up  ·  emulator {self._host}  ·  {redact_url(self._settings.database_url)}"
            f"  ·  {elapsed:,.0f}s  ·  " + ("stopping..." if stopping else "Ctrl-C to stop")
        )
        return Group(header, totals, per)

    def summary(self, elapsed: float, codes: dict[str, int]) -> str:
        """After every child stopped: the scanner's own final count (its last log line, written
        at exit) and the rows counted now, so published >= new rows; processed is the last
        scrape of processors that are gone, a lower bound."""
        processed = self._total("mini_scan_messages_acked_total")
        published = max(self._published, _scanner_confirmed(self._scanner_log))
        rows = self._count_rows()
        exits = ", ".join(f"{name}={code}" for name, code in codes.items())
        return (
            f"stopped after {elapsed:,.0f}s: published {published:,}, processed at least "
            f"{processed:,.0f}, {rows:,} rows ({rows - self._rows_before:,} new) in "
            f"{redact_url(self._settings.database_url)}; exit codes: {exits}"
        )

    def _total(self, name: str) -> float:
        return sum(c.stats.get(name, 0.0) for c in self._children)

    def _count_rows(self) -> int:
        try:
            if self._reader is None:  # the database file appears with the first processor
                self._reader = read_engine(self._settings.database_url)
            with self._reader.connect() as connection:
                count = connection.execute(sa.text("SELECT count(*) FROM services")).scalar_one()
            return int(count)
        except (QueryError, sa.exc.SQLAlchemyError):
            return self._rows


def _scrape(port: int) -> dict[str, float]:
    """Metric samples from a processor's /metrics (labels summed), or {} if it does not answer."""
    totals: dict[str, float] = {}
    for sample, value in scrape(port, timeout=1).items():
        name = sample.split("{", 1)[0]
        totals[name] = totals.get(name, 0.0) + value
    return totals


def _scanner_confirmed(log: Path) -> int:
    """The scanner's latest confirmed count, from its JSON log lines."""
    with contextlib.suppress(OSError, ValueError):
        for line in reversed(log.read_text(errors="replace").splitlines()[-20:]):
            if line.startswith("{") and "confirmed" in line:
                return int(json.loads(line)["confirmed"])
    return 0


def _free_port() -> int:
    """A port free now on the loopback interface, for a processor's metrics server."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
