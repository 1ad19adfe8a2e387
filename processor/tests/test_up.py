"""`mini-scan up`: the whole pipeline locally; Ctrl-C leaves nothing behind."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys

import psutil

from emulator.testing import wait_until


def count_rows(path) -> int:
    try:
        with sqlite3.connect(path) as connection:
            return connection.execute("SELECT count(*) FROM services").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_up_stores_rows_and_stops_every_child_on_sigint(tmp_path):
    # Given `mini-scan up` with its own emulator and a database in the test's directory
    database = tmp_path / "data" / "scan_results.db"
    env = {k: v for k, v in os.environ.items() if k != "PUBSUB_EMULATOR_HOST"}
    up = subprocess.Popen(
        [sys.executable, "-m", "processor.cli", "up", "--processors", "2", "--rate", "200"],
        cwd=tmp_path,
        env=env | {"DATABASE_URL": f"sqlite:///{database}"},
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
    assert "processor-1=0" in output
    assert "processor-2=0" in output
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert (tmp_path / "data" / "logs" / "processor-1.log").exists()
