"""`python -m processor.datadir`: whatever ./data already holds, it ends up the processors' user's
and nobody else's."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from processor.commands.datadir import lock_down, sqlite_path
from processor.errors import DataDirError

OTHER_UID = 4242
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def leave_database(directory: Path) -> Path:
    """A database with its -wal and -shm, 0600 in a 0700 directory, owned by another user
    where the test can make it so."""
    directory.mkdir()
    database = directory / "scan_results.db"
    for path in (database, directory / "scan_results.db-wal", directory / "scan_results.db-shm"):
        path.write_bytes(b"")
        path.chmod(0o600)
    directory.chmod(0o700)
    if os.geteuid() == 0:
        for path in [directory, *directory.iterdir()]:
            os.chown(path, OTHER_UID, OTHER_UID)
    return database


IMAGE_UID = 10001


def owners_and_modes(directory: Path) -> dict[str, tuple[int, int, int]]:
    return {
        path.name: (path.lstat().st_uid, path.lstat().st_gid, mode(path))
        for path in [directory, *directory.iterdir()]
    }


@as_root
def test_the_directory_and_database_files_go_to_the_processors_user_private(tmp_path) -> None:
    database = leave_database(tmp_path / "data")
    database.parent.chmod(0o777)  # as the old `datadir` left it
    for path in database.parent.iterdir():
        path.chmod(0o666)

    changed = lock_down(database, IMAGE_UID, IMAGE_UID)

    assert owners_and_modes(database.parent) == {
        "data": (IMAGE_UID, IMAGE_UID, 0o700),
        "scan_results.db": (IMAGE_UID, IMAGE_UID, 0o600),
        "scan_results.db-wal": (IMAGE_UID, IMAGE_UID, 0o600),
        "scan_results.db-shm": (IMAGE_UID, IMAGE_UID, 0o600),
    }
    assert len(changed) == 4
    assert lock_down(database, IMAGE_UID, IMAGE_UID) == []  # nothing left to change


def test_a_missing_directory_is_made_private(tmp_path) -> None:
    database = tmp_path / "data" / "scan_results.db"

    lock_down(database, os.getuid(), os.getgid())

    assert mode(database.parent) == 0o700
    assert not database.exists()


@pytest.mark.parametrize("plant", ["symlink", "hardlink", "fifo"])
def test_a_database_file_that_is_a_link_is_refused_and_left_alone(tmp_path, plant) -> None:
    database = leave_database(tmp_path / "data")
    outside = tmp_path / "secret"
    outside.write_text("x")
    outside.chmod(0o644)
    wal = database.parent / "scan_results.db-wal"
    wal.unlink()
    if plant == "symlink":
        wal.symlink_to(outside)
    elif plant == "hardlink":
        wal.hardlink_to(outside)
    else:
        os.mkfifo(wal)
    before = (outside.stat().st_uid, mode(outside))

    with pytest.raises(DataDirError, match=f"{wal} is a .*: move it away"):
        lock_down(database, IMAGE_UID, IMAGE_UID)

    assert (outside.stat().st_uid, mode(outside)) == before


@as_root
def test_other_files_in_the_directory_are_left_alone(tmp_path) -> None:
    database = leave_database(tmp_path / "data")
    notes = database.parent / "notes.txt"
    notes.write_text("x")
    notes.chmod(0o640)
    os.chown(notes, OTHER_UID, OTHER_UID)

    lock_down(database, IMAGE_UID, IMAGE_UID)

    assert (notes.stat().st_uid, mode(notes)) == (OTHER_UID, 0o640)


def test_only_a_sqlite_file_url_names_a_directory_to_prepare() -> None:
    assert sqlite_path("sqlite:////app/data/scan_results.db") == Path("/app/data/scan_results.db")
    assert sqlite_path("postgresql://u:p@postgres:5432/scans") is None
    assert sqlite_path("sqlite://") is None


def datadir(url: str, *args: str, prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url, "LOG_FORMAT": "json"}
    cmd = [*prefix, sys.executable, "-m", "processor.datadir", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_a_postgres_database_needs_no_preparing() -> None:
    result = datadir("postgresql://u:p@postgres:5432/scans")

    assert result.returncode == 0, result.stderr
    assert '"event": "data_dir_not_needed"' in result.stdout


def setpriv(*options: str) -> list[str]:
    path = shutil.which("setpriv")
    if path is None:
        pytest.skip("setpriv (util-linux) is not installed")
    return [path, *options]


@as_root
def test_the_owner_writes_the_table_and_another_local_user_cannot_open_it() -> None:
    # Outside pytest's private temporary directory, so that other users can reach ./data.
    with tempfile.TemporaryDirectory() as parent:
        os.chmod(parent, 0o711)  # noqa: S103 (search only, nothing to list or write)
        owner_writes_and_others_cannot_open(Path(parent) / "data" / "scan_results.db")


def owner_writes_and_others_cannot_open(database: Path) -> None:
    database.parent.mkdir(mode=0o755)
    database.write_bytes(b"")  # as root left it on the host: 0644
    result = datadir(f"sqlite:///{database}", "--owner", f"{IMAGE_UID}:{IMAGE_UID}")
    assert result.returncode == 0, result.stderr
    assert '"event": "data_dir_ready"' in result.stdout
    # The shell, not Python: another uid cannot read this checkout or its interpreter.
    write = ["sh", "-c", 'echo x >> "$1" && : > "$1-journal"', "sh", str(database)]
    read = ["sh", "-c", 'cat "$1"', "sh", str(database)]

    owner = setpriv(f"--reuid={IMAGE_UID}", f"--regid={IMAGE_UID}", "--clear-groups")
    other = setpriv("--reuid=4243", "--regid=4243", "--clear-groups")
    wrote = subprocess.run([*owner, *write], capture_output=True, check=False)
    peeked = subprocess.run([*other, *read], capture_output=True, check=False)

    assert wrote.returncode == 0, wrote.stderr
    assert database.read_bytes() == b"x\n"
    assert peeked.returncode != 0
    assert b"Permission denied" in peeked.stderr
    assert (database.stat().st_uid, mode(database.parent)) == (IMAGE_UID, 0o700)
    assert not [p for p in database.parent.iterdir() if mode(p) & 0o002]


@as_root
def test_where_it_may_not_change_owners_it_says_what_to_run(tmp_path) -> None:
    # As root without capabilities, on files another user owns: as under a rootless engine or on
    # a root-squashing NFS mount. Still uid 0, so the checkout stays readable even in a private
    # (0700) directory, which another uid could not import from.
    database = tmp_path / "data" / "scan_results.db"
    database.parent.mkdir(mode=0o755)
    database.write_bytes(b"")
    for path in (database.parent, database):
        os.chown(path, OTHER_UID, OTHER_UID)
    drop = setpriv("--bounding-set=-all", "--inh-caps=-all")

    result = datadir(f"sqlite:///{database}", prefix=drop)

    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1
    assert f"cannot give {database.parent} to 10001:10001" in result.stderr
    assert "sudo chown -R 10001:10001 ./data && sudo chmod -R go-rwx ./data" in result.stderr
    assert (database.parent.stat().st_uid, mode(database.parent)) == (OTHER_UID, 0o755)
