"""`mini-scan migrate`: bring the database schema to the newest revision, then exit."""

from __future__ import annotations

import argparse

from processor.commands import run_command
from processor.config import ArgumentParser, DatabaseSettings, add_arguments, load
from processor.errors import StartupError, first_line
from processor.runtime.logs import redact_url
from processor.storage import migrate, open_engine, unsuitable


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description="Bring the database schema up to date.")
    add_arguments(parser, DatabaseSettings)
    return run_command(parser, _migrate, argv)


def _migrate(args: argparse.Namespace) -> int:
    settings = load(DatabaseSettings, args)
    try:
        engine = open_engine(settings.database_url)
        migrate(engine)
        problem = unsuitable(engine)
    except Exception as exc:  # whatever the database or the driver says, in one line
        raise StartupError(first_line(exc)) from exc
    if problem:
        raise StartupError(problem)
    print(f"database at {redact_url(settings.database_url)} is up to date")
    return 0
