"""`mini-scan healthcheck`: each role the image runs is healthy exactly when it works."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from emulator import Emulator
from emulator.cli import _parse as emulator_arguments
from emulator.testing import free_port
from processor.commands import healthcheck
from processor.commands.healthcheck import check, main, role_of
from processor.config import ProcessorSettings
from processor.runtime.health import HealthServer
from processor.runtime.metrics import Metrics

MINI_SCAN = "/app/.venv/bin/mini-scan"


@pytest.fixture
def health_server() -> Iterator[HealthServer]:
    server = HealthServer("127.0.0.1", 0, Metrics(), lambda: False).start()
    yield server
    server.stop()


def test_a_processor_is_healthy_while_its_healthz_answers(health_server: HealthServer) -> None:
    cmdline = [MINI_SCAN, "process", "--metrics-port", str(health_server.port)]

    assert check(cmdline, environ={}) is None
    health_server.stop()
    assert f":{health_server.port}/healthz" in (check(cmdline, environ={}) or "")


def test_the_processor_check_takes_the_port_and_host_from_the_environment(
    health_server: HealthServer,
) -> None:
    environ = {"METRICS_PORT": str(health_server.port), "METRICS_HOST": "0.0.0.0"}

    assert check([MINI_SCAN, "process"], environ=environ) is None
    assert check([MINI_SCAN, "process"], environ={"METRICS_PORT": str(free_port())}) is not None


def test_a_processor_with_its_metrics_server_off_is_healthy_while_it_runs() -> None:
    assert check([MINI_SCAN, "process"], environ={"METRICS_PORT": "0"}) is None


def test_an_emulator_is_healthy_while_its_port_takes_connections() -> None:
    emulator = Emulator(port=0).start()
    port = emulator.address.rsplit(":", 1)[1]
    cmdline = [MINI_SCAN, "emulator", "--host", "0.0.0.0", "--port", port]
    try:
        assert check(cmdline, environ={}) is None
    finally:
        emulator.stop(grace=0)

    assert f"emulator port 127.0.0.1:{port}" in (check(cmdline, environ={}) or "")


@pytest.mark.parametrize("command", ["scan", "setup", "up", "services", "dlq", "migrate"])
def test_every_other_command_is_healthy_while_it_runs(command: str) -> None:
    assert check([MINI_SCAN, command, "--metrics-port", "1"], environ={}) is None


def test_the_role_is_found_behind_an_init_and_in_python_m() -> None:
    assert role_of(["/sbin/docker-init", "--", "mini-scan", "process"]) == ("process", [])
    assert role_of(["python", "-m", "emulator", "--port", "1"]) == ("emulator", ["--port", "1"])
    assert role_of(["python", "-m", "processor"]) == ("process", [])
    assert role_of(["python", "-m", "processor.datadir"]) == (None, [])


def test_its_defaults_are_the_processor_and_emulator_defaults() -> None:
    fields = ProcessorSettings.model_fields

    assert fields["metrics_port"].default == healthcheck.METRICS_PORT
    assert fields["metrics_host"].default == healthcheck.METRICS_HOST
    assert emulator_arguments([]).port == healthcheck.EMULATOR_PORT


def test_it_reads_the_role_of_a_running_process(health_server: HealthServer, capsys) -> None:
    # A process whose arguments read like `mini-scan process --metrics-port N`.
    argv = [sys.executable, "-c", "import time; time.sleep(60)", "mini-scan", "process"]
    sleeper = subprocess.Popen([*argv, "--metrics-port", str(health_server.port)])
    closed = subprocess.Popen([*argv, "--metrics-port", str(free_port())])
    try:
        assert main(["--pid", str(sleeper.pid)]) == 0
        assert main(["--pid", str(closed.pid)]) == 1
    finally:
        for process in (sleeper, closed):
            process.kill()
            process.wait()

    err = capsys.readouterr().err
    assert err.startswith("mini-scan healthcheck: unhealthy: http://127.0.0.1:")
    assert err.count("\n") == 1
