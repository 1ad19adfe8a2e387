"""`mini-scan`: one command, a subcommand per job; each is a module's `main(argv) -> int`."""

from __future__ import annotations

import importlib
import sys

from processor.stopping import exit_on_signals

# name: ("module:function", summary). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "up": (
        "processor.commands.up:main",
        "run everything locally: emulator, setup, scanner, processors",
    ),
    "setup": ("processor.commands.setup:main", "create the topics and subscriptions (idempotent)"),
    "process": ("processor.commands.process:main", "consume the subscription into the database"),
    "scan": ("scanner.cli:main", "publish scan results (the mock scanner)"),
    "emulator": ("emulator.cli:main", "serve the project's Pub/Sub emulator"),
    "services": ("processor.commands.query:services_main", "query the stored services"),
    "stats": ("processor.commands.query:stats_main", "counts per service, newest scan, rows"),
    "dlq": ("processor.commands.dlq:main", "inspect and replay dead letters"),
    "migrate": ("processor.commands.migrate:main", "bring the database schema up to date"),
    "healthcheck": (
        "processor.commands.healthcheck:main",
        "exit 0 if this container's role is healthy",
    ),
    "datadir": ("processor.commands.datadir:main", "make the SQLite data directory writable"),
}

NO_CREDENTIALS = (
    "no Google Cloud credentials: set PUBSUB_EMULATOR_HOST (or --pubsub-emulator-host) to use an "
    "emulator, or GOOGLE_APPLICATION_CREDENTIALS for Pub/Sub itself"
)

# These run until stopped, so a stop is their normal end (exit 0); the others do a job and exit
# 128 + the signal when stopped before it was done (processor/stopping.py).
RUN_UNTIL_STOPPED = {"up", "process", "scan", "emulator"}


def _usage() -> str:
    lines = [
        "usage: mini-scan COMMAND [options]   (mini-scan COMMAND --help for its options)",
        "       mini-scan --version",
        "",
    ]
    lines += [f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from processor import version

        print(f"mini-scan {version()}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(
            f"mini-scan: error: unknown command {name!r} (mini-scan --help lists them)",
            file=sys.stderr,
        )
        return 2
    module_name, function_name = COMMANDS[name][0].split(":")
    with exit_on_signals(0 if name in RUN_UNTIL_STOPPED else None):
        function = getattr(importlib.import_module(module_name), function_name)
        sys.argv[0] = f"mini-scan {name}"  # argparse's default prog, in every subcommand's help
        try:
            return int(function(rest) or 0)
        except Exception as exc:  # the first Pub/Sub client a command makes finds no credentials
            if not _missing_credentials(exc):
                raise
            print(f"mini-scan {name}: error: {NO_CREDENTIALS}", file=sys.stderr)
            return 2


def _missing_credentials(exc: Exception) -> bool:
    # Not imported up front: `healthcheck`, run every few seconds, never loads google.auth.
    auth = sys.modules.get("google.auth.exceptions")
    return auth is not None and isinstance(exc, auth.DefaultCredentialsError)


if __name__ == "__main__":
    sys.exit(main())
