"""`python -m emulator` / `mini-scan emulator`: run the emulator until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import signal
import threading

import structlog

from emulator.server import Emulator, EmulatorStartError

_log = structlog.get_logger("emulator")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, not argparse's usage block: this is usually read in a CI log.
        self.exit(2, f"emulator: error: {message}\n")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="emulator", description="Embedded Google Cloud Pub/Sub emulator.")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=8085, help="gRPC port (0: any free port)")
    parser.add_argument("--rest-port", type=int, default=None, help="also serve REST here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the emulator in the foreground; returns 0 after a clean SIGTERM/SIGINT shutdown."""
    args = _parse(argv)
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        emulator = Emulator(host=args.host, port=args.port, rest_port=args.rest_port).start()
    except (EmulatorStartError, OSError) as exc:
        _log.error("emulator_start_failed", error=str(exc))
        return 1
    try:
        stop.wait()
    finally:
        emulator.stop(grace=1.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
