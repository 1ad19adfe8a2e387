"""`python -m emulator`: logs where it listens, stops cleanly on SIGTERM, rejects bad flags."""

from __future__ import annotations

import signal
import subprocess
import sys

import grpc
import pytest

from emulator.cli import main
from emulator.testing import free_port


def test_the_command_serves_until_sigterm_then_exits_zero():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=20)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert f"127.0.0.1:{port}" in out.splitlines()[0]


def test_a_bad_flag_is_a_one_line_error_with_exit_code_2(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--port", "not-a-number"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--port" in err
