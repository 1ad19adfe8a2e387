"""Helpers for tests across the project: polling with a deadline, free ports, Google's emulator."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

OFFICIAL_EMULATOR = Path(
    "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator"
)

# CI=true: a test that needs an external part (PostgreSQL, Docker, promtool, Google's emulator)
# fails when it is missing instead of skipping.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


class OfficialEmulatorUnavailable(RuntimeError):
    """Google's emulator is not installed (or Java is missing), or it did not start."""


def wait_until(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02
) -> bool:
    """Poll `predicate` until it is truthy or `timeout` seconds pass; returns the last verdict."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)


# Under pytest-xdist, each worker draws ports from a range of its own below the kernel's ephemeral
# ports (32768 and up), so two workers never pick the same one and the kernel never hands it out.
_WORKER_PORTS = 1500
_WORKER_BASE = 20000


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual race applies)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return s.getsockname()[1]
    base = _WORKER_BASE + int(worker[2:]) % 8 * _WORKER_PORTS
    start = random.randrange(_WORKER_PORTS)
    for offset in range(_WORKER_PORTS):
        port = base + (start + offset) % _WORKER_PORTS
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {base}..{base + _WORKER_PORTS - 1}")


def _port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def official_emulator_command(host: str, port: int) -> list[str]:
    """The command that starts Google's emulator, or raise OfficialEmulatorUnavailable."""
    if OFFICIAL_EMULATOR.exists() and shutil.which("java"):
        return [str(OFFICIAL_EMULATOR), f"--host={host}", f"--port={port}"]
    gcloud = shutil.which("gcloud")
    if gcloud and shutil.which("java"):
        return [gcloud, "beta", "emulators", "pubsub", "start", f"--host-port={host}:{port}"]
    raise OfficialEmulatorUnavailable("Google's Pub/Sub emulator (and Java) is not installed")


@contextlib.contextmanager
def official_emulator(startup_timeout: float = 60.0) -> Iterator[str]:
    """Start Google's emulator on a free port, yield its host:port, and kill the JVM on exit."""
    host, port = "127.0.0.1", free_port()
    cmd = official_emulator_command(host, port)
    with tempfile.TemporaryDirectory(prefix="official-pubsub-") as data_dir:
        log = open(os.path.join(data_dir, "emulator.log"), "wb")  # noqa: SIM115
        # A session of its own, so the launcher script and its JVM go down together.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if (
                not wait_until(
                    lambda: _port_open(host, port) or proc.poll() is not None,
                    timeout=startup_timeout,
                    interval=0.2,
                )
                or proc.poll() is not None
            ):
                raise OfficialEmulatorUnavailable(
                    f"Google's emulator did not start: {Path(log.name).read_text()[-500:]}"
                )
            yield f"{host}:{port}"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.close()


@contextlib.contextmanager
def official_emulator_for_tests() -> Iterator[str]:
    """Google's emulator for a test fixture. Like every external part of the suite, a missing
    or broken one skips the test locally and fails it when CI=true (.ci/run checks that the
    emulator is installed)."""
    import pytest  # only tests call this

    try:
        with official_emulator() as host:
            yield host
            return
    except OfficialEmulatorUnavailable as exc:
        problem = str(exc)
    if IN_CI:
        pytest.fail(f"{problem} (CI=true: Google's emulator tests must run)")
    pytest.skip(problem)


@contextlib.contextmanager
def emulator_process(startup_timeout: float = 30.0) -> Iterator[str]:
    """Our emulator in a child process on a free port (so it does not share the caller's GIL);
    yields its host:port once it listens, and stops it on exit."""
    host, port = "127.0.0.1", free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator", "--host", host, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if not wait_until(lambda: _port_open(host, port), timeout=startup_timeout, interval=0.1):
            raise RuntimeError("the emulator did not start")
        yield f"{host}:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
