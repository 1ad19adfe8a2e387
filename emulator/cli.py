"""`python -m emulator` / `mini-scan emulator`: run the emulator until SIGTERM or SIGINT.

Logging follows the same contract as every mini-scan role: LOG_FORMAT (json or console; console
on a terminal, else json) and LOG_LEVEL, each also a flag that wins over the variable.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import sys

import structlog

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


def configure_logging(log_format: str | None, level: str | None) -> None:
    """structlog to stdout: JSON lines, or a console renderer (the default on a terminal)."""
    console = (log_format or "").lower() == "console" or (
        log_format is None and sys.stdout.isatty()
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName((level or "INFO").upper())
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the emulator in the foreground; returns 0 after a clean SIGTERM/SIGINT shutdown."""
    args = _parse(argv)
    configure_logging(args.log_format, args.log_level)
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
