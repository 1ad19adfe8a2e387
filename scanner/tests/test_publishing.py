"""The scanner against the emulator, through the real google-cloud-pubsub client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emulator.testing import free_port, wait_until
from processor.schema import Rejection, decode
from scanner.cli import main
from scanner.malformed import MALFORMED_REASONS
from scanner.tests.helpers import PROJECT, Stream, make_stream, pull_all


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_count_n_puts_exactly_n_messages_on_the_subscription(stream: Stream, tmp_path) -> None:
    log = tmp_path / "published.jsonl"
    argv = ["--count", "3000", "--rate", "0", "--seed", "11", "--keys", "100", "--log", str(log)]
    argv += ["--duplicates", "0.1", "--out-of-order", "0.1", "--malformed", "0.1"]

    assert main([*argv, *stream.flags]) == 0

    received = pull_all(stream.subscription, expected=3000)
    lines = {line["message_id"]: line for line in read_log(log)}
    assert len(received) == 3000
    assert lines.keys() == received.keys()
    assert sorted(line["seq"] for line in lines.values()) == list(range(3000))
    for message_id, data in received.items():
        line = lines[message_id]
        if line["kind"] == "malformed":
            with pytest.raises(Rejection) as rejected:
                decode(data)
            assert rejected.value.reason == line["reason"]
        else:
            observation = decode(data, max_skew=0)
            assert observation._asdict() == {f: line[f] for f in observation._fields}


def test_every_kind_is_published_and_logged(stream: Stream, tmp_path) -> None:
    log = tmp_path / "published.jsonl"
    argv = ["--count", "500", "--rate", "0", "--seed", "1", "--log", str(log)]
    argv += ["--duplicates", "0.2", "--out-of-order", "0.2", "--malformed", "0.3"]

    assert main([*argv, *stream.flags]) == 0

    lines = read_log(log)
    assert {line["kind"] for line in lines} == {"valid", "duplicate", "out_of_order", "malformed"}
    reasons = {line["reason"] for line in lines if line["kind"] == "malformed"}
    assert reasons == {str(reason) for reason in MALFORMED_REASONS}


def test_the_rate_paces_publishing(stream: Stream, tmp_path) -> None:
    """Kills the pacing removed: 10 messages at 20 a second take at least 9 intervals of 50 ms
    (only a lower bound: a loaded machine is slower, never faster)."""
    log = tmp_path / "published.jsonl"
    started = time.monotonic()

    assert main(["--count", "10", "--rate", "20", "--log", str(log), *stream.flags]) == 0

    assert time.monotonic() - started >= 9 / 20
    assert len(pull_all(stream.subscription, expected=10)) == 10
    assert [line["kind"] for line in read_log(log)] == ["valid"] * 10


def test_a_missing_topic_is_one_line_and_a_non_zero_exit(stream: Stream) -> None:
    env = {**os.environ, "PUBSUB_EMULATOR_HOST": stream.address}
    cmd = [sys.executable, "-m", "scanner", "--count", "1", "--pubsub-project-id", PROJECT]
    result = subprocess.run(
        [*cmd, "--pubsub-topic", "no-such-topic"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"mini-scan scan: error: topic projects/{PROJECT}/topics/no-such-topic does not exist: "
        "run `mini-scan setup` first"
    ]


def test_sigterm_flushes_what_was_published_and_exits_zero(stream: Stream, tmp_path) -> None:
    log = tmp_path / "published.jsonl"
    env = {**os.environ, "PUBSUB_EMULATOR_HOST": stream.address, "LOG_FORMAT": "json"}
    cmd = [sys.executable, "-m", "scanner", "--rate", "200", "--log", str(log), *stream.flags]
    scanner = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 50, 30)
        scanner.send_signal(signal.SIGTERM)
        _, stderr = scanner.communicate(timeout=30)
    finally:
        scanner.kill()

    assert scanner.returncode == 0, stderr
    published = read_log(log)
    assert len(pull_all(stream.subscription, expected=len(published))) == len(published)
    records = [json.loads(line) for line in stderr.splitlines()]
    assert records[-1]["event"] == "scanner_finished"
    assert records[-1]["confirmed"] == len(published)
    # Cloud Logging reads `severity`; every line has it, the libraries' too.
    assert [r["severity"] for r in records] == [r["level"].upper() for r in records]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_scanner_waiting_for_pubsub_stops_at_once_and_exits_zero(tmp_path, stop) -> None:
    # Given a scanner whose Pub/Sub does not answer (nothing listens at its address)
    log = tmp_path / "scanner.log"
    env = {**os.environ, "PUBSUB_EMULATOR_HOST": f"127.0.0.1:{free_port()}", "LOG_FORMAT": "json"}
    with open(log, "wb") as out:
        cmd = [sys.executable, "-m", "scanner", "--pubsub-project-id", PROJECT]
        scanner = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_until(
            lambda: "waiting_for_dependency" in log.read_text() or scanner.poll() is not None, 60
        ), log.read_text()
        # When it is stopped while it waits for its topic
        scanner.send_signal(stop)
        # Then it ends at once, with 0: a stop is the scanner's normal end
        assert scanner.wait(timeout=10) == 0, log.read_text()
    finally:
        scanner.kill()
        scanner.wait()
    assert "Traceback" not in log.read_text()
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {"waiting_for_dependency", "scanner_stopped"} <= {r["event"] for r in records}
    assert all(r["severity"] == r["level"].upper() for r in records), records


@pytest.mark.parametrize(
    ("flags", "complaint"),
    [
        (["--duplicates", "0.6", "--malformed", "0.6"], "add up to more than 1"),
        (["--pubsub-project-id", ""], "invalid PUBSUB_PROJECT_ID"),
    ],
)
def test_inconsistent_settings_are_one_line_and_exit_2(flags, complaint, capsys) -> None:
    assert main(["--count", "1", *flags]) == 2

    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert complaint in err


@pytest.mark.parametrize("flags", [["--rate", "-1"], ["--count", "0"], ["--malformed", "2"]])
def test_a_bad_flag_value_is_one_line_and_exit_2(flags, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(flags)

    assert exited.value.code == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_two_runs_with_one_seed_and_base_timestamp_publish_the_same_bytes(
    emulator, monkeypatch, tmp_path
) -> None:
    published = []
    for run in ("first", "second"):
        stream = make_stream(emulator, monkeypatch)
        log = tmp_path / f"{run}.jsonl"
        argv = ["--count", "300", "--rate", "0", "--seed", "3", "--base-timestamp", "1700000000"]
        argv += ["--keys", "10", "--duplicates", "0.2", "--malformed", "0.2", "--log", str(log)]
        assert main([*argv, *stream.flags]) == 0
        received = pull_all(stream.subscription, expected=300)
        by_seq = {line["seq"]: received[line["message_id"]] for line in read_log(log)}
        published.append([by_seq[seq] for seq in range(300)])

    assert published[0] == published[1]
