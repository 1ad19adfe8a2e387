"""The processor as a process: SIGTERM, kill -9, start-up and configuration errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import sqlalchemy as sa

from emulator.testing import free_port, wait_until
from processor.commands.setup import ensure_resources
from processor.config import SetupSettings
from processor.storage import database_url
from processor.tests.helpers.oracle import expected_rows, stored_rows
from processor.tests.helpers.pipeline import (
    metric,
    observations,
    publish_observations,
    reaches_oracle,
    unique,
)


def busy_processor(make_pipeline, spawn_processor, seed: int):
    """A processor child that has committed part of a backlog of 6,000 unique keys."""
    pipeline = make_pipeline()
    items = [o._replace(port=i) for i, o in enumerate(observations(6000, keys=250, seed=seed))]
    publish_observations(pipeline, items)
    child = spawn_processor(pipeline, BATCH_SIZE="100")
    assert wait_until(lambda: len(pipeline.rows()) > 0, timeout=30), child.output()
    return pipeline, items, child


def test_sigterm_mid_stream_exits_0_in_the_grace_period_and_acks_nothing_uncommitted(
    our_emulator, emulator_host, make_pipeline, spawn_processor
):
    """Kills: shutdown not flushing what is held (`Processor.shutdown` handing it back instead),
    and acks of the flushed batch not sent before the streams close."""
    # Given a processor holding messages of a backlog of unique keys (any lost message is a
    # missing row), none committed yet: its batches flush at 10,000 messages or after a minute
    pipeline = make_pipeline()
    items = [o._replace(port=i) for i, o in enumerate(observations(6000, keys=250, seed=11))]
    publish_observations(pipeline, items)
    child = spawn_processor(pipeline, BATCH_SIZE="10000", BATCH_MAX_WAIT_MS="60000")
    child.wait_ready()
    received = lambda: metric(child.metrics_port, "mini_scan_messages_received_total")  # noqa: E731
    assert wait_until(lambda: received() >= 1000, timeout=30), child.output()
    assert pipeline.rows() == []
    # When it gets SIGTERM
    child.signal(signal.SIGTERM)
    started = time.monotonic()
    # Then it exits 0 within its grace period (10 s; compose and Kubernetes kill at 15 s),
    # having committed what it held
    assert child.wait(timeout=20) == 0, child.output()
    assert time.monotonic() - started < 10 + 5
    assert any(e["event"] == "shutdown_complete" and e["flushed"] for e in child.events())
    stored = len(pipeline.rows())
    assert 1000 <= stored < len(items)
    # And acked exactly those: the emulator still has every other message, and only those
    ready, leased = pipeline.backlog(our_emulator)
    assert ready + leased == len(items) - stored
    # And another processor drains the rest to exactly the oracle
    stop = pipeline.start_processor()
    assert reaches_oracle(pipeline, items, timeout=60)
    assert stop() == 0


def test_kill_9_mid_batch_then_restart_ends_at_the_oracle(
    emulator_host, make_pipeline, spawn_processor
):
    pipeline, items, child = busy_processor(make_pipeline, spawn_processor, seed=12)
    child.signal(signal.SIGKILL)
    assert child.wait(timeout=10) == -signal.SIGKILL
    replacement = spawn_processor(pipeline)

    # The killed process's unacked messages come back when their leases end.
    assert wait_until(
        lambda: stored_rows(pipeline.rows()) == expected_rows(items), timeout=90, interval=0.5
    ), replacement.output()


def waiting_for(child, dependency: str) -> bool:
    """The child has logged that it is waiting for `dependency` (its start-up retry loop)."""
    return any(
        e["event"] == "waiting_for_dependency" and e["dependency"] == dependency
        for e in child.events()
    )


def unreachable() -> str:
    """host:port of a Pub/Sub emulator that is not there (nothing listens: refused at once)."""
    return f"127.0.0.1:{free_port()}"


@pytest.mark.parametrize(
    ("why", "stop"),
    [
        ("missing", signal.SIGTERM),
        ("missing", signal.SIGINT),
        ("unreachable", signal.SIGTERM),
    ],
    ids=["missing-sigterm", "missing-sigint", "pubsub-unreachable-sigterm"],
)
def test_a_processor_waiting_for_its_subscription_stops_at_once_and_exits_0(
    emulator_host, make_pipeline, spawn_processor, why, stop
):
    # Given a processor whose subscription does not exist yet (or whose Pub/Sub does not
    # answer), willing to wait two minutes for it
    where = {"PUBSUB_SUBSCRIPTION": unique("not-yet")}
    if why == "unreachable":
        where = {"PUBSUB_EMULATOR_HOST": unreachable()}
    child = spawn_processor(make_pipeline(), STARTUP_TIMEOUT="120", **where)
    assert wait_until(
        lambda: waiting_for(child, "subscription") or child.process.poll() is not None, 60
    ), child.output()
    # When it is told to stop while it waits
    child.signal(stop)
    # Then it exits 0 within its grace period (10 s), not when the wait times out
    assert child.wait(timeout=10) == 0, child.output()
    assert any(e["event"] == "stopped_during_startup" for e in child.events())
    assert "Traceback" not in child.output()


def test_a_processor_waiting_for_its_database_stops_at_once_and_exits_0(
    emulator_host, make_pipeline, spawn_processor
):
    # Given a processor whose PostgreSQL server refuses connections (nothing listens there)
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    child = spawn_processor(make_pipeline(), DATABASE_URL=closed, STARTUP_TIMEOUT="120")
    assert wait_until(
        lambda: waiting_for(child, "database") or child.process.poll() is not None, 60
    ), child.output()
    # When it gets SIGTERM while it waits
    child.signal(signal.SIGTERM)
    # Then it exits 0 within its grace period
    assert child.wait(timeout=10) == 0, child.output()
    assert "Traceback" not in child.output()


def test_a_processor_stopped_while_python_imports_it_exits_0_without_a_traceback(
    emulator_host, make_pipeline, spawn_processor
):
    # Given a processor still importing its modules (Python reports each import as it ends)
    child = spawn_processor(make_pipeline(), PYTHONPROFILEIMPORTTIME="1")
    assert wait_until(lambda: "google" in child.output() or child.process.poll() is not None, 60)
    # When it gets SIGTERM before it has started anything
    child.signal(signal.SIGTERM)
    # Then it ends at once with the documented code, not killed by the signal
    assert child.wait(timeout=10) == 0, child.output()[-2000:]
    assert "Traceback" not in child.output()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_setup_waiting_for_pubsub_stops_at_once_and_exits_128_plus_the_signal(tmp_path, stop):
    # Given `mini-scan setup` against an emulator address where nothing listens
    log = tmp_path / "setup.log"
    with open(log, "wb") as out:
        setup = subprocess.Popen(
            [sys.executable, "-m", "processor.cli", "setup", "--startup-timeout", "120"],
            env=os.environ | {"PUBSUB_EMULATOR_HOST": unreachable(), "LOG_FORMAT": "json"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        assert wait_until(
            lambda: "waiting_for_dependency" in log.read_text() or setup.poll() is not None, 60
        ), log.read_text()
        # When it is stopped while it waits
        setup.send_signal(stop)
        # Then it ends at once: not done, so 128 + the signal (130, 143), and one line saying so
        assert setup.wait(timeout=10) == 128 + stop, log.read_text()
    finally:
        setup.kill()
        setup.wait()
    output = log.read_text()
    assert "Traceback" not in output
    assert output.splitlines()[-1] == "mini-scan setup: stopped while waiting for Pub/Sub"


def run_processor(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "processor", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | env,
    )


def test_invalid_configuration_is_one_line_and_exit_code_2():
    result = run_processor("--streams", "many")

    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "STREAMS" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_missing_subscription_fails_start_up_with_one_line(emulator_host):
    result = run_processor(
        "--pubsub-subscription", unique("missing"), "--startup-timeout", "1", "--metrics-port", "0"
    )

    assert result.returncode == 1
    assert "does not exist" in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "Traceback" not in result.stderr + result.stdout


def test_setup_is_idempotent(emulator_host):
    names = SetupSettings(
        pubsub_topic=unique("t"),
        pubsub_subscription=unique("s"),
        pubsub_dead_letter_topic=unique("d"),
        pubsub_dead_letter_subscription=unique("ds"),
    )

    assert len(ensure_resources(names)) == 4
    assert ensure_resources(names) == []


@pytest.mark.postgres
@pytest.mark.parametrize("consumer", ["batch"])  # a start-up check: one consumer is enough
def test_a_postgresql_database_not_in_utf8_is_refused_in_one_line(
    emulator_host, make_pipeline, postgres_server_url
):
    # Given a LATIN1 database (it would refuse most of the world's responses, row by row)
    admin = sa.create_engine(database_url(postgres_server_url), isolation_level="AUTOCOMMIT")
    name = f"mini_scan_latin1_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.exec_driver_sql(
            f"CREATE DATABASE \"{name}\" ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' "
            "TEMPLATE template0"
        )
    url = database_url(postgres_server_url).set(database=name)
    try:
        pipeline = make_pipeline(database_url=url.render_as_string(hide_password=False))
        # When the processor, or `mini-scan migrate`, starts on it
        process = run_processor(
            "--pubsub-subscription",
            pipeline.settings.pubsub_subscription,
            "--database-url",
            pipeline.settings.database_url,
            "--metrics-port",
            "0",
        )
        migrate = subprocess.run(
            [sys.executable, "-m", "processor.cli", "migrate"],
            capture_output=True,
            text=True,
            timeout=60,
            env=os.environ | {"DATABASE_URL": pipeline.settings.database_url},
        )
        # Then each refuses at once, in one line saying what to do
        for result in (process, migrate):
            assert result.returncode == 1
            assert result.stderr.strip().count("\n") == 0, result.stderr
            assert "LATIN1" in result.stderr
            assert "UTF8" in result.stderr
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


# A signal's Python handler runs in the main thread between two bytecodes, wherever that thread
# is: here, inside `stop.wait()` at the moment it holds the request's own lock. Setting the
# request from the handler would then wait on that lock forever, and the process would never stop.
_STOP_WHILE_HOLDING_THE_LOCK = """
import os, signal
from processor.stopping import stop_on_signals
with stop_on_signals() as stop:
    with stop._cond:
        os.kill(os.getpid(), signal.{name})
    print(stop.wait(10) and stop.exit_code())
"""


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_stop_arriving_while_the_main_thread_holds_the_requests_lock_is_heard(stop: str):
    done = subprocess.run(
        [sys.executable, "-c", _STOP_WHILE_HOLDING_THE_LOCK.format(name=stop)],
        capture_output=True,
        text=True,
        timeout=20,
    )

    assert done.stdout.strip() == str(128 + getattr(signal, stop)), done.stderr
