"""`mini-scan`: a user error at the command line is one line on stderr and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from processor.cli import COMMANDS, NO_CREDENTIALS, main

BAD_FLAGS = {
    "up": ["--processors", "x"],
    "setup": ["--no-such-flag"],
    "process": ["--streams", "many"],
    "scan": ["--rate", "-1"],
    "emulator": ["--port", "x"],
    "services": ["--port", "x"],
    "stats": ["--no-such-flag"],
    "dlq": ["list", "--samples", "x"],
    "migrate": ["--no-such-flag"],
    "healthcheck": ["--pid", "x"],
    "datadir": ["--streams", "x"],
}


def run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse exits; the console script would too
        return int(exit_.code or 0)


def test_every_command_has_a_bad_flag_case():
    assert set(BAD_FLAGS) == set(COMMANDS)


@pytest.mark.parametrize("command", sorted(BAD_FLAGS))
def test_a_bad_flag_is_one_line_and_exit_code_2(command: str, capsys):
    code = run([command, *BAD_FLAGS[command]])

    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0, err
    assert "error" in err
    assert "Traceback" not in err


def test_an_unknown_command_is_one_line_and_exit_code_2(capsys):
    assert run(["bogus"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_help_lists_every_command(capsys):
    assert run(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        ("process", ["-m", "processor", "--metrics-port", "0"]),
        ("scan", ["-m", "scanner", "--count", "1"]),
        ("setup", ["-m", "processor.cli", "setup"]),
        ("dlq", ["-m", "processor.cli", "dlq", "list"]),
    ],
)
def test_no_emulator_and_no_credentials_is_one_line_and_exit_code_2(command, argv, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PUBSUB_", "GOOGLE_"))}
    env |= {"HOME": str(tmp_path), "CLOUDSDK_CONFIG": str(tmp_path), "NO_GCE_CHECK": "True"}

    done = subprocess.run(
        [sys.executable, *argv], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )

    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"mini-scan {command}: error: {NO_CREDENTIALS}"]
