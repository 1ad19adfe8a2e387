"""`mini-scan up`: the whole pipeline locally; Ctrl-C leaves nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil

from emulator.testing import free_port, wait_until


def count_rows(path) -> int:
    try:
        with sqlite3.connect(path) as connection:
            return connection.execute("SELECT count(*) FROM services").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_up_stores_rows_and_stops_every_child_on_sigint(tmp_path):
    # Given `mini-scan up` with its own emulator and a database in the test's directory, asked
    # through the environment for the client consumer (not the default)
    database = tmp_path / "data" / "scan_results.db"
    env = {k: v for k, v in os.environ.items() if k != "PUBSUB_EMULATOR_HOST"}
    up = subprocess.Popen(
        [sys.executable, "-m", "processor.cli", "up", "--processors", "2", "--rate", "200"],
        cwd=tmp_path,
        env=env | {"DATABASE_URL": f"sqlite:///{database}", "CONSUMER": "client"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        # When it has run long enough to store rows
        assert wait_until(lambda: count_rows(database) > 50 or up.poll() is not None, timeout=90)
        assert up.poll() is None
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 3  # the scanner and two processors
        # And it gets Ctrl-C
        up.send_signal(signal.SIGINT)
        output = up.communicate(timeout=60)[0].decode()
    finally:
        if up.poll() is None:
            up.kill()
    # Then it exits 0, with a summary, and no child is left behind
    assert up.returncode == 0, output
    assert "stopped after" in output
    # And its summary's counts agree: the scanner's final count, taken after it exited, is at
    # least the rows it added (catches a count re-read from a log before the scanner's last line)
    summary = re.search(r"published ([\d,]+), .*?\(([\d,]+)\s+new\)", output, re.S)
    assert summary is not None, output
    published, new_rows = (int(n.replace(",", "")) for n in summary.groups())
    assert published >= new_rows > 0
    assert "processor-1=0" in output
    assert "processor-2=0" in output
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    # And the caller's settings reached the processors: they ran the client consumer
    for name in ("processor-1", "processor-2"):
        log = (tmp_path / "data" / "logs" / f"{name}.log").read_text()
        opened = [json.loads(line) for line in log.splitlines() if '"streams_open"' in line]
        assert [event["consumer"] for event in opened] == ["client"], log[-2000:]


def start_up(tmp_path: Path, *flags: str, **env: str) -> tuple[subprocess.Popen[bytes], Path]:
    """`mini-scan up` in the test's directory, its output to a file; (process, output path)."""
    output = tmp_path / "up.out"
    base = {k: v for k, v in os.environ.items() if k != "PUBSUB_EMULATOR_HOST"}
    with open(output, "wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "processor.cli", "up", "--processors", "2", *flags],
            cwd=tmp_path,
            env=base | env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return up, output


def left_behind(database_url: str) -> list[psutil.Process]:
    """Live processes started for this test's pipeline (children inherit its DATABASE_URL),
    wherever they are now: an orphan is no longer anybody's child."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if (
                process.environ().get("DATABASE_URL") == database_url
                and process.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(process)
    return found


@contextlib.contextmanager
def stopped_at_the_end(up: subprocess.Popen[bytes], database_url: str) -> Iterator[None]:
    """Whatever the test found, kill what it started (an orphan too) once it is done."""
    try:
        yield
    finally:
        if up.poll() is None:
            up.kill()
        for process in left_behind(database_url):
            with contextlib.suppress(psutil.Error):
                process.kill()
        up.wait()


def test_up_stopped_while_setup_waits_for_pubsub_exits_0_at_once_and_starts_nothing(tmp_path):
    # Given `mini-scan up` whose setup waits for a Pub/Sub where nothing listens
    url = f"sqlite:///{tmp_path / 'scans.db'}"
    up, output = start_up(
        tmp_path, PUBSUB_EMULATOR_HOST=f"127.0.0.1:{free_port()}", DATABASE_URL=url
    )
    with stopped_at_the_end(up, url):
        assert wait_until(
            lambda: "waiting_for_dependency" in output.read_text() or up.poll() is not None, 90
        ), output.read_text()
        # When it gets Ctrl-C while it waits
        up.send_signal(signal.SIGINT)
        # Then it exits 0 at once, and started no child
        assert up.wait(timeout=10) == 0, output.read_text()
        assert not left_behind(url)
    assert "Traceback" not in output.read_text()


def test_up_stopped_while_its_processors_wait_for_the_database_stops_every_child_in_time(
    tmp_path,
):
    # Given `mini-scan up` whose processors wait for a PostgreSQL server that refuses them
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    up, output = start_up(tmp_path, DATABASE_URL=url)
    logs = [tmp_path / "data" / "logs" / f"processor-{i}.log" for i in (1, 2)]
    with stopped_at_the_end(up, url):
        assert wait_until(
            lambda: (
                all(log.exists() and "waiting_for_dependency" in log.read_text() for log in logs)
                or up.poll() is not None
            ),
            90,
        ), output.read_text()
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 3  # the scanner and two processors
        # When it gets Ctrl-C while they wait
        up.send_signal(signal.SIGINT)
        # Then every child stops within its own grace (10 s; up kills at 15 s) with exit code 0,
        # and so does up
        assert up.wait(timeout=30) == 0, output.read_text()
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    text = " ".join(output.read_text().split())  # the summary wraps at the terminal's width
    assert "exit codes: scanner=0, processor-1=0, processor-2=0" in text, text


def test_up_that_cannot_start_a_child_stops_those_it_started_and_says_why(tmp_path):
    # Given a log path the second child (processor-1) cannot open: it is a directory
    (tmp_path / "data" / "logs" / "processor-1.log").mkdir(parents=True)
    url = f"sqlite:///{tmp_path / 'scans.db'}"
    up, output = start_up(tmp_path, DATABASE_URL=url)
    with stopped_at_the_end(up, url):
        # When up has started the scanner and fails to start processor-1
        # Then it exits 1 with one line saying why
        assert up.wait(timeout=90) == 1, output.read_text()
        # And the scanner it did start is not left running (it was started: its log exists)
        assert (tmp_path / "data" / "logs" / "scanner.log").exists()
        assert not left_behind(url)
    lines = output.read_text().splitlines()
    assert "mini-scan up: error: [Errno 21] Is a directory: 'data/logs/processor-1.log'" in lines
    assert "Traceback" not in output.read_text()
