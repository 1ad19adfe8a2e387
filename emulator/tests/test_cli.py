"""`python -m emulator`: logs where it listens, stops cleanly on SIGTERM, rejects bad flags."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys

import grpc
import pytest
import structlog

from emulator.cli import main
from emulator.logs import configure_logging
from emulator.testing import free_port, wait_until


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
    # Cloud Logging reads `severity` (without it every line shows as DEFAULT).
    assert all(json.loads(line)["severity"] == "INFO" for line in lines)


def test_a_start_failure_is_a_json_line_with_severity_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = subprocess.run(
            [sys.executable, "-m", "emulator", "--port", str(taken.getsockname()[1])],
            capture_output=True,
            text=True,
            env={**os.environ, "LOG_FORMAT": "json"},
            timeout=30,
        )

    assert done.returncode == 1
    [record] = [json.loads(line) for line in done.stdout.splitlines()]
    assert (record["event"], record["severity"]) == ("emulator_start_failed", "ERROR")


def test_grpcs_own_log_lines_come_through_the_same_json_renderer(capsys):
    root = logging.getLogger()
    handlers, level = root.handlers, root.level
    try:
        configure_logging("INFO", "json")
        logging.getLogger("grpc._server").error("Exception calling application: %s", "boom")
    finally:
        root.handlers, root.level = handlers, level
        structlog.reset_defaults()

    record = json.loads(capsys.readouterr().out)
    assert record["event"] == "Exception calling application: boom"
    assert (record["logger"], record["severity"]) == ("grpc._server", "ERROR")


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


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_stopped_while_python_imports_it_the_command_exits_0_without_a_traceback(stop, tmp_path):
    # Given `python -m emulator` still importing its modules (Python reports each import as it
    # ends, on stderr)
    err = tmp_path / "stderr"
    with open(err, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "emulator", "--port", str(free_port())],
            stdout=subprocess.DEVNULL,
            stderr=out,
            text=True,
        )
    try:
        assert wait_until(
            lambda: "google" in err.read_text() or proc.poll() is not None, 30, interval=0.005
        )
        # When it is stopped before it has started anything
        proc.send_signal(stop)
        # Then it ends at once with 0, as after serving, not killed by the signal
        assert proc.wait(timeout=10) == 0, err.read_text()[-2000:]
    finally:
        proc.kill()
    assert "Traceback" not in err.read_text()
