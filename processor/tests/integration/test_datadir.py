"""`python -m processor.datadir`: whatever ./data already holds, the processors can write it."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from processor.commands.datadir import open_up, sqlite_path

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


def test_the_database_and_its_wal_files_become_writable_for_all_owners_kept(tmp_path) -> None:
    database = leave_database(tmp_path / "data")
    owners = {path: path.stat().st_uid for path in database.parent.iterdir()}

    changed = open_up(database)

    assert mode(database.parent) == 0o777
    assert {path.name: mode(path) for path in owners} == {
        "scan_results.db": 0o666,
        "scan_results.db-wal": 0o666,
        "scan_results.db-shm": 0o666,
    }
    assert {path: path.stat().st_uid for path in owners} == owners
    assert len(changed) == 4
    assert open_up(database) == []  # nothing left to change the second time


def test_other_files_and_symlinks_are_left_alone(tmp_path) -> None:
    database = leave_database(tmp_path / "data")
    outside = tmp_path / "secret"
    outside.write_text("x")
    outside.chmod(0o600)
    (database.parent / "scan_results.db-wal").unlink()
    (database.parent / "scan_results.db-wal").symlink_to(outside)
    notes = database.parent / "notes.txt"
    notes.write_text("x")
    notes.chmod(0o600)

    open_up(database)

    assert (mode(outside), mode(notes)) == (0o600, 0o600)


def test_only_a_sqlite_file_url_names_a_directory_to_prepare() -> None:
    assert sqlite_path("sqlite:////app/data/scan_results.db") == Path("/app/data/scan_results.db")
    assert sqlite_path("postgresql://u:p@postgres:5432/scans") is None
    assert sqlite_path("sqlite://") is None


def datadir(url: str, *prefix: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url, "LOG_FORMAT": "json"}
    cmd = [*prefix, sys.executable, "-m", "processor.datadir"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_a_postgres_database_needs_no_preparing() -> None:
    result = datadir("postgresql://u:p@postgres:5432/scans")

    assert result.returncode == 0, result.stderr
    assert '"event": "data_dir_not_needed"' in result.stdout


@as_root
def test_where_it_may_not_change_modes_it_says_what_to_run(tmp_path) -> None:
    # As root without capabilities, on files another user owns: as under a rootless engine or on
    # a root-squashing NFS mount. Still uid 0, so the checkout stays readable even in a private
    # (0700) directory, which another uid could not import from.
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    database = tmp_path / "data" / "scan_results.db"
    database.parent.mkdir(mode=0o755)
    database.write_bytes(b"")
    for path in (database.parent, database):
        os.chown(path, OTHER_UID, OTHER_UID)
    drop = [setpriv, "--bounding-set=-all", "--inh-caps=-all"]

    result = datadir(f"sqlite:///{database}", *drop)

    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1
    assert f"cannot make {database.parent} writable" in result.stderr
    assert "sudo chmod -R a+rwX" in result.stderr
    assert mode(database.parent) == 0o755
