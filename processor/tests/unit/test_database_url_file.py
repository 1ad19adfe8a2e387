"""DATABASE_URL_FILE: the database URL read from a file (a mounted secret), for every command
that opens the database; errors are one line, exit code 2, and never show the secret."""

from __future__ import annotations

import pytest

from processor.cli import main
from processor.commands.up import UpSettings, _environment
from processor.config import DatabaseSettings, ProcessorSettings, load
from processor.errors import ConfigError

SECRET_URL = "postgresql://app:s3cret-password@db.internal:5432/scans?sslmode=verify-full"


@pytest.fixture(autouse=True)
def no_database_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("DATABASE_URL_FILE", raising=False)


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "database-url"
    path.write_text(SECRET_URL + "\n")  # as `echo URL > file` and most secret stores write it
    return path


@pytest.mark.parametrize("settings_class", [DatabaseSettings, ProcessorSettings, UpSettings])
def test_the_url_is_read_from_the_file_without_its_trailing_newline(
    settings_class, secret_file, monkeypatch
):
    monkeypatch.setenv("DATABASE_URL_FILE", str(secret_file))

    assert load(settings_class).database_url == SECRET_URL


def test_without_either_setting_the_default_sqlite_file_is_used():
    assert load(DatabaseSettings).database_url == "sqlite:///data/scan_results.db"


@pytest.mark.parametrize("url_from", ["environment", "flag"])
def test_setting_both_the_url_and_its_file_is_a_config_error(url_from, secret_file, monkeypatch):
    monkeypatch.setenv("DATABASE_URL_FILE", str(secret_file))
    if url_from == "environment":
        monkeypatch.setenv("DATABASE_URL", "sqlite:///other.db")
        flags = None
    else:
        flags = _flags(database_url="sqlite:///other.db")

    with pytest.raises(ConfigError, match="DATABASE_URL and DATABASE_URL_FILE are both set"):
        load(DatabaseSettings, flags)


def test_the_file_flag_is_read_like_the_variable(secret_file):
    assert load(DatabaseSettings, _flags(database_url_file=str(secret_file))).database_url == (
        SECRET_URL
    )


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda path: None, "No such file or directory"),
        (lambda path: path.mkdir(), "Is a directory"),
        (lambda path: path.write_text("\n"), "is empty"),
        (lambda path: path.write_bytes(b"\xff\xfe" + SECRET_URL.encode()), "not UTF-8 text"),
    ],
    ids=["missing", "directory", "empty", "binary"],
)
def test_an_unusable_file_is_a_one_line_exit_2_naming_the_file(
    make, expected, tmp_path, monkeypatch, capsys
):
    path = tmp_path / "database-url"
    make(path)
    monkeypatch.setenv("DATABASE_URL_FILE", str(path))

    code = main(["migrate"])

    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1
    assert expected in error
    assert str(path) in error


def test_an_unreadable_file_is_a_config_error(secret_file, monkeypatch):
    secret_file.chmod(0)
    if secret_file.stat().st_uid == 0 and _readable(secret_file):
        pytest.skip("root reads any file")
    monkeypatch.setenv("DATABASE_URL_FILE", str(secret_file))

    with pytest.raises(ConfigError, match="Permission denied"):
        load(DatabaseSettings)


@pytest.mark.parametrize("command", ["migrate", "services", "stats", "process"])
def test_no_error_shows_the_secret(command, secret_file, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL_FILE", str(secret_file))
    monkeypatch.setenv("DATABASE_URL", "sqlite:///other.db")  # both: the error names them

    code = main([command])

    output = capsys.readouterr()
    assert code == 2
    assert "s3cret-password" not in output.out + output.err
    assert "DATABASE_URL_FILE" in output.err


def test_up_hands_its_children_the_file_not_the_secret(secret_file, monkeypatch):
    monkeypatch.setenv("DATABASE_URL_FILE", str(secret_file))

    env = _environment(load(UpSettings), "127.0.0.1:8085")

    assert env["DATABASE_URL_FILE"] == str(secret_file)
    assert "DATABASE_URL" not in env
    assert "s3cret-password" not in "".join(env.values())


def test_up_hands_its_children_a_plain_url_without_a_file_setting(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "sqlite:///here.db")

    env = _environment(load(UpSettings), "127.0.0.1:8085")

    assert env["DATABASE_URL"] == "sqlite:///here.db"
    assert "DATABASE_URL_FILE" not in env


def _flags(**values: str):
    import argparse

    return argparse.Namespace(**values)


def _readable(path) -> bool:
    try:
        path.read_bytes()
    except OSError:
        return False
    return True
