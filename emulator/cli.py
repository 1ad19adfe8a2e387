"""`python -m emulator` / `mini-scan emulator`: run the emulator until SIGTERM or SIGINT.

Logging follows the same contract as every mini-scan role (emulator/logs.py): LOG_FORMAT (json or
console; console on a terminal, else json) and LOG_LEVEL, each also a flag that wins over the
variable; JSON lines carry `severity`, and grpc's own log lines come through the same renderer.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal

import structlog

from emulator.logs import configure_logging
from emulator.server import Emulator, EmulatorStartError

_log = structlog.get_logger("emulator")

LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, not argparse's usage block: this is usually read in a CI log.
        self.exit(2, f"emulator: error: {message}\n")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="emulator", description="Embedded Google Cloud Pub/Sub emulator.")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=8085, help="gRPC port (0: any free port)")
    parser.add_argument("--rest-port", type=int, default=None, help="also serve REST here")
    parser.add_argument("--log-format", choices=LOG_FORMATS, help="json or console (LOG_FORMAT)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="(LOG_LEVEL, default INFO)")
    args = parser.parse_args(argv)
    for name, allowed in (("log_format", LOG_FORMATS), ("log_level", LOG_LEVELS)):
        if getattr(args, name) is None:
            value = os.environ.get(name.upper()) or None
            if value is not None and value.upper() not in (a.upper() for a in allowed):
                parser.error(f"{name.upper()}={value!r}: expected one of {', '.join(allowed)}")
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the emulator in the foreground; returns 0 after a clean SIGTERM/SIGINT shutdown."""
    args = _parse(argv)
    configure_logging((args.log_level or "INFO").upper(), (args.log_format or "").lower() or None)
    # The handler only puts on a queue (a reentrant `put`): setting an Event from a handler can
    # wait forever on the lock its own thread holds inside `Event.wait()`.
    stops: queue.SimpleQueue[int] = queue.SimpleQueue()
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: stops.put(signum))
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        emulator = Emulator(host=args.host, port=args.port, rest_port=args.rest_port).start()
    except (EmulatorStartError, OSError) as exc:
        _log.error("emulator_start_failed", error=str(exc))
        return 1
    try:
        stops.get()
    finally:
        emulator.stop(grace=1.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
