"""`mini-scan healthcheck`: the image's HEALTHCHECK, right for whichever role the container runs.

The role is the command the container was started with, read from PID 1's arguments (after
`mini-scan`, also behind an init such as `docker run --init`). A processor is healthy while its
`/healthz` answers 200, an emulator while its gRPC port takes connections; every other command
(scan, setup, up, the query tools) is healthy while it runs, which is all Docker can ask of it.

It runs every few seconds in every container, so it imports only the standard library: no
settings classes, no SQLAlchemy. The defaults below are the processor's and the emulator's own
(a test holds them equal).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

METRICS_PORT = 9100  # ProcessorSettings.metrics_port
METRICS_HOST = "127.0.0.1"  # ProcessorSettings.metrics_host
EMULATOR_PORT = 8085  # `mini-scan emulator --port`
TIMEOUT_SECONDS = 3.0
_MODULE_ROLES = {"processor": "process", "emulator": "emulator", "scanner": "scan"}


def role_of(cmdline: Sequence[str]) -> tuple[str | None, list[str]]:
    """The `mini-scan` command in a process's arguments, and the arguments after it.

    `... mini-scan process --metrics-port 9200` gives ("process", ["--metrics-port", "9200"]);
    `python -m emulator --port 8086` gives ("emulator", ["--port", "8086"]).
    """
    for i, arg in enumerate(cmdline):
        if Path(arg).name == "mini-scan" and i + 1 < len(cmdline):
            return cmdline[i + 1], list(cmdline[i + 2 :])
        if arg == "-m" and i + 1 < len(cmdline) and cmdline[i + 1] in _MODULE_ROLES:
            return _MODULE_ROLES[cmdline[i + 1]], list(cmdline[i + 2 :])
    return None, []


def check(cmdline: Sequence[str], environ: dict[str, str] | None = None) -> str | None:
    """None when the process started with `cmdline` is healthy, else why it is not."""
    env = os.environ if environ is None else environ
    role, args = role_of(cmdline)
    if role == "process":
        return _check_processor(args, env)
    if role == "emulator":
        return _check_emulator(args)
    return None  # alive is all a one-shot or the scanner can show


def _check_processor(args: list[str], env: dict[str, str]) -> str | None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--metrics-port", default=env.get("METRICS_PORT", METRICS_PORT))
    parser.add_argument("--metrics-host", default=env.get("METRICS_HOST", METRICS_HOST))
    known, _ = parser.parse_known_args(args)
    port = int(known.metrics_port)
    if port == 0:
        return None  # METRICS_PORT=0 switches the server off: nothing more to ask
    host = _reachable(known.metrics_host)
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            return None if response.status == 200 else f"{url} answered {response.status}"
    except (OSError, urllib.error.URLError) as exc:
        return f"{url}: {exc}"


def _check_emulator(args: list[str]) -> str | None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=EMULATOR_PORT)
    known, _ = parser.parse_known_args(args)
    address = (_reachable(known.host), known.port)
    try:
        socket.create_connection(address, timeout=TIMEOUT_SECONDS).close()
    except OSError as exc:
        return f"emulator port {address[0]}:{address[1]}: {exc}"
    return None


def _reachable(host: str) -> str:
    """A server bound to every interface is asked on the loopback one."""
    if host in ("", "0.0.0.0"):  # noqa: S104 (compared, not bound)
        return "127.0.0.1"
    return "::1" if host == "::" else host


class _Parser(argparse.ArgumentParser):
    """One-line usage errors, like every mini-scan command (without importing the settings)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    """0 when the container's main process is healthy; 1 with a one-line reason otherwise."""
    parser = _Parser(
        prog="mini-scan healthcheck",
        description="Exit 0 if this container's main process (PID 1, or --pid) is healthy.",
    )
    parser.add_argument("--pid", type=int, default=1, help="the process to check (default 1)")
    args = parser.parse_args(argv)
    try:
        raw = Path(f"/proc/{args.pid}/cmdline").read_bytes()
    except OSError as exc:
        print(f"mini-scan healthcheck: cannot read process {args.pid}: {exc}", file=sys.stderr)
        return 1
    problem = check([part.decode(errors="replace") for part in raw.split(b"\0") if part])
    if problem:
        print(f"mini-scan healthcheck: unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0
