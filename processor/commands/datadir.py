"""`mini-scan datadir` (and `python -m processor.datadir`): hand the SQLite directory to the
processors' user, private to it.

Compose runs it once, as root with only CAP_CHOWN, CAP_FOWNER and CAP_DAC_READ_SEARCH, before any
processor starts. The directory is a bind mount of the host's ./data, so what it holds may belong
to anyone: Docker creates a missing ./data owned by root, and a database made on the host first
(`uv run mini-scan up`, a `sqlite3` query) belongs to the host user.

The rule: the directory and the database with its -wal, -shm and -journal files become owned by
`--owner` (the uid:gid the processors run as: MINI_SCAN_UID:MINI_SCAN_GID in compose, the image's
10001:10001 by default), the directory 0700 and the files 0600, so no other local user can read
the table, rewrite it or plant a -wal file SQLite would replay. The directory is locked first, so
nothing in it can be swapped afterwards; a database file that is a symbolic link, a hard link or
not a regular file is refused (the processors would write through it), and no link is followed.
Where root may not change owners (a rootless engine, a root-squashing NFS mount) it exits 1 with
the command that fixes it.
"""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import structlog

from processor.commands import run_command
from processor.config import ArgumentParser, ProcessorSettings, add_arguments, load
from processor.errors import ConfigError, DataDirError
from processor.runtime.logs import configure_logging
from processor.storage import database_url

_log = structlog.get_logger("processor.commands.datadir")
SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")
IMAGE_USER = "10001:10001"  # the Dockerfile's USER
DIRECTORY_MODE, FILE_MODE = 0o700, 0o600


def sqlite_path(url: str) -> Path | None:
    """The database file a `DATABASE_URL` names, or None when it is not a SQLite file."""
    parsed = database_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database).absolute()


def parse_owner(text: str) -> tuple[int, int]:
    """`UID:GID`, both numbers (the container has no names for the host's users)."""
    uid, _, gid = text.partition(":")
    if not (uid.isdigit() and gid.isdigit()):
        raise ConfigError(f"invalid --owner {text!r}: expected UID:GID, two numbers")
    return int(uid), int(gid)


def lock_down(database: Path, uid: int, gid: int) -> list[str]:
    """Give the database's directory and files to uid:gid, private to it; the paths changed."""
    directory = database.parent
    files = [directory / (database.name + suffix) for suffix in SQLITE_SUFFIXES]
    changed, path = [], directory
    try:
        directory.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
        for path, mode in [(directory, DIRECTORY_MODE), *((f, FILE_MODE) for f in files)]:
            if _hand_over(path, uid, gid, mode):
                changed.append(str(path))
    except PermissionError as exc:
        raise DataDirError(
            f"cannot give {path} to {uid}:{gid} ({exc.strerror}): on the host, run "
            f"`sudo chown -R {uid}:{gid} ./data && sudo chmod -R go-rwx ./data` (or on DATA_DIR, "
            f"the directory mounted at {directory})"
        ) from exc
    return changed


def _hand_over(path: Path, uid: int, gid: int, mode: int) -> bool:
    """chown and chmod one directory or regular file through a descriptor opened without
    following a link; False when it was already so or does not exist."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    kind = stat.S_IFDIR if mode == DIRECTORY_MODE else stat.S_IFREG
    if stat.S_IFMT(info.st_mode) != kind or (kind == stat.S_IFREG and info.st_nlink != 1):
        what = "symbolic link" if stat.S_ISLNK(info.st_mode) else "link or special file"
        raise DataDirError(
            f"{path} is a {what}, which the processors would write through: move it away "
            f"(`mv {path} {path}.moved`) and run this again"
        )
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path, flags | (os.O_DIRECTORY if kind == stat.S_IFDIR else 0))
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
            raise DataDirError(f"{path} changed while it was being prepared: run this again")
        if (opened.st_uid, opened.st_gid, stat.S_IMODE(opened.st_mode)) == (uid, gid, mode):
            return False
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        return True
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="mini-scan datadir",
        description=(
            "Give the processor's SQLite directory and files to the processors' user, "
            "private to it (run as root)."
        ),
    )
    parser.add_argument(
        "--owner",
        default=IMAGE_USER,
        metavar="UID:GID",
        help=f"the user the processors run as (default {IMAGE_USER}, the image's user)",
    )
    add_arguments(parser, ProcessorSettings)
    return run_command(parser, _datadir, argv)


def _datadir(args: argparse.Namespace) -> int:
    uid, gid = parse_owner(args.owner)
    settings = load(ProcessorSettings, args)
    configure_logging(settings.log_level, settings.log_format)
    database = sqlite_path(settings.database_url)
    if database is None:
        _log.info("data_dir_not_needed", reason="DATABASE_URL is not a SQLite file")
        return 0
    changed = lock_down(database, uid, gid)
    _log.info("data_dir_ready", directory=str(database.parent), owner=args.owner, changed=changed)
    return 0
