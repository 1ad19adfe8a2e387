"""The metrics and health server bounds what a client on the pod network can hold: an idle
connection is dropped after its timeout, and connections past the cap are closed unserved."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from emulator.testing import wait_until
from processor.runtime.health import HealthServer
from processor.runtime.metrics import Metrics
from processor.tests.helpers.pipeline import http_get


@pytest.fixture
def server() -> Iterator[HealthServer]:
    health = HealthServer(
        "127.0.0.1", 0, Metrics(), lambda: True, idle_seconds=1.0, max_connections=4
    ).start()
    yield health
    health.stop()


def idle_connection(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def closed_by_server(connection: socket.socket) -> bool:
    try:
        return connection.recv(1) == b""
    except ConnectionResetError:
        return True


def test_an_idle_connection_is_dropped_after_its_timeout(server) -> None:
    # Catches: no handler timeout (the connection, and its thread, would stay forever).
    connection = idle_connection(server.port)
    started = time.monotonic()

    assert closed_by_server(connection)
    assert time.monotonic() - started < 5
    connection.close()


def test_connections_past_the_cap_are_closed_and_service_resumes(server) -> None:
    # Given every slot held by an idle client
    held = [idle_connection(server.port) for _ in range(4)]
    assert wait_until(lambda: server._server._slots._value == 0, 5)  # type: ignore[attr-defined]
    # Then one more is closed at once, unserved. Catches: no cap (it would wait for a request)
    extra = idle_connection(server.port)
    extra.settimeout(0.5)
    assert closed_by_server(extra)
    # And once the idle ones time out, the server answers again
    assert wait_until(lambda: http_get(server.port, "/healthz")[0] == 200, 10)
    for connection in [*held, extra]:
        connection.close()
