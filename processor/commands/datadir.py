"""`mini-scan datadir` (and `python -m processor.datadir`): make the SQLite directory writable.

Compose runs it once, as root with only CAP_FOWNER, before any processor starts. The directory is
a bind mount of the host's ./data, so what it holds may belong to anyone: Docker creates a missing
./data owned by root, and a database made on the host first (`uv run mini-scan up`, a `sqlite3`
query, as the host user or root) is 0644 or 0600, which the image's user (uid 10001) cannot write;
every processor would then fail with "attempt to write a readonly database" and restart forever.

The rule: the directory becomes 0777 and the database with its -wal, -shm and -journal files gains
read and write for everyone, keeping its owner, so the host user and the container can both use
it (0777, not 1777, so the host user can delete what the processor wrote). Where root may not do
that (a rootless engine, a root-squashing NFS mount) it exits 1 with the command that fixes it.
"""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import structlog

from processor.commands import run_command
from processor.config import ArgumentParser, ProcessorSettings, add_arguments, load
from processor.errors import DataDirError
from processor.runtime.logs import configure_logging
from processor.storage import database_url

_log = structlog.get_logger("processor.commands.datadir")
SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def sqlite_path(url: str) -> Path | None:
    """The database file a `DATABASE_URL` names, or None when it is not a SQLite file."""
    parsed = database_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).absolute()


def open_up(database: Path) -> list[str]:
    """Make the database's directory and files usable by any user; the paths changed."""
    directory = database.parent
    files = [directory / (database.name + suffix) for suffix in SQLITE_SUFFIXES]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        changed = [directory] if _add_mode(directory, 0o777) else []
        for path in files:
            if path.is_file() and not path.is_symlink() and _add_mode(path, 0o666):
                changed.append(path)
    except PermissionError as exc:
        raise DataDirError(
            f"cannot make {exc.filename} writable for the processors ({exc.strerror}): on the "
            f"host, run `sudo chmod -R a+rwX` on the directory mounted at {directory} "
            "(./data, or DATA_DIR), or remove the database files in it"
        ) from exc
    return [str(path) for path in changed]


def _add_mode(path: Path, bits: int) -> bool:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & bits == bits:
        return False
    os.chmod(path, mode | bits)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="mini-scan datadir",
        description="Make the processor's SQLite directory and files writable (run as root).",
    )
    add_arguments(parser, ProcessorSettings)
    return run_command(parser, _datadir, argv)


def _datadir(args: argparse.Namespace) -> int:
    settings = load(ProcessorSettings, args)
    configure_logging(settings.log_level, settings.log_format)
    database = sqlite_path(settings.database_url)
    if database is None:
        _log.info("data_dir_not_needed", reason="DATABASE_URL is not a SQLite file")
        return 0
    changed = open_up(database)
    _log.info("data_dir_ready", directory=str(database.parent), opened_up=changed)
    return 0
