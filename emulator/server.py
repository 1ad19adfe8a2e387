"""`Emulator`: the broker with its gRPC (and optional REST) front, started and stopped as one."""

from __future__ import annotations

from concurrent import futures
from types import TracebackType

import structlog

from emulator.broker import Broker
from emulator.faults import Faults
from emulator.grpc_server import build_server
from emulator.streaming import StreamRegistry

_log = structlog.get_logger(__name__)


class EmulatorStartError(RuntimeError):
    """The emulator could not bind its port."""


class Emulator:
    """An in-process Pub/Sub emulator; `start()` returns self, and it works as a context manager.

    `address` is what goes into PUBSUB_EMULATOR_HOST. `stop()` ends every open StreamingPull with
    UNAVAILABLE (never OK) before the server goes away.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, rest_port: int | None = None):
        self.host = host
        self._port = port
        self._rest_port = rest_port
        self.broker = Broker()
        self.faults = Faults()
        self._streams = StreamRegistry()
        # Each open StreamingPull holds a worker for its lifetime, so the pool is generous.
        self._executor = futures.ThreadPoolExecutor(
            max_workers=128, thread_name_prefix="emulator-grpc"
        )
        self._server = build_server(self.broker, self.faults, self._streams, self._executor)
        self._rest = None
        self.address = ""
        self.rest_address: str | None = None
        self._started = False

    def start(self) -> Emulator:
        try:
            bound = self._server.add_insecure_port(f"{self.host}:{self._port}")
        except RuntimeError as exc:
            raise EmulatorStartError(f"cannot listen on {self.host}:{self._port}: {exc}") from exc
        if bound == 0:
            raise EmulatorStartError(f"cannot listen on {self.host}:{self._port}")
        self.address = f"{self.host}:{bound}"
        self.broker.start()
        self._server.start()
        if self._rest_port is not None:
            from emulator.rest import RestServer

            self._rest = RestServer(self.broker, self.host, self._rest_port)
            self.rest_address = self._rest.start()
        self._started = True
        _log.info("emulator_listening", grpc=self.address, rest=self.rest_address)
        return self

    def stats(self) -> dict[str, int]:
        """The broker's counters: dead letters forwarded, and forwards that failed."""
        return self.broker.stats()

    def drop_streams(self) -> None:
        """Abort every open StreamingPull with UNAVAILABLE, as a network blip would."""
        self.broker.close_all_streams("UNAVAILABLE", "Stream dropped by the emulator.")

    def stop(self, grace: float | None = 1.0) -> None:
        """Close streams with UNAVAILABLE, stop serving, and join the emulator's threads."""
        if not self._started:
            return
        self._started = False
        self.broker.begin_shutdown()
        if self._rest is not None:
            self._rest.stop()
        self._server.stop(grace).wait()
        self.broker.stop()
        self._streams.join(timeout=5.0)
        self._executor.shutdown(wait=True)
        _log.info("emulator_stopped", grpc=self.address)

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
