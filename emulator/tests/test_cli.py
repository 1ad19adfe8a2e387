"""`python -m emulator`: logs where it listens, stops cleanly on SIGTERM, rejects bad flags."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import grpc
import pytest

from emulator.cli import main
from emulator.testing import free_port


def _serve_and_stop(env: dict[str, str], *args: str) -> tuple[int, str]:
    """Run `python -m emulator` until it listens, SIGTERM it, and return (exit code, stdout)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator", "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **env},
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=20)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    return proc.returncode, out


def test_the_command_serves_until_sigterm_then_exits_zero():
    code, out = _serve_and_stop({"LOG_LEVEL": "INFO"})

    assert code == 0
    assert "127.0.0.1:" in out.splitlines()[0]


def test_a_bad_flag_is_a_one_line_error_with_exit_code_2(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--port", "not-a-number"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--port" in err


def test_with_log_format_json_every_stdout_line_is_a_json_object():
    code, out = _serve_and_stop({"LOG_FORMAT": "json", "LOG_LEVEL": "INFO"})

    lines = out.splitlines()
    assert code == 0
    assert [json.loads(line)["event"] for line in lines] == [
        "emulator_listening",
        "emulator_stopped",
    ]
    assert all(json.loads(line)["level"] == "info" for line in lines)


def test_the_log_format_and_level_flags_win_over_the_environment():
    code, out = _serve_and_stop(
        {"LOG_FORMAT": "console"}, "--log-format", "json", "--log-level", "WARNING"
    )

    assert code == 0
    assert out == "", "INFO lines are filtered out at WARNING"


def test_an_unknown_log_format_is_a_one_line_error_with_exit_code_2():
    done = subprocess.run(
        [sys.executable, "-m", "emulator", "--port", "0"],
        capture_output=True,
        text=True,
        env={**os.environ, "LOG_FORMAT": "xml"},
        timeout=20,
    )

    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert "LOG_FORMAT" in done.stderr
