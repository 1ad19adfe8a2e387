"""`mini-scan services` and `mini-scan stats` against seeded tables on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import time

import pytest

from processor.commands.query import services_main, stats_main
from processor.schema import Observation
from processor.storage import Repository, open_engine

NOW = int(time.time())
SEED = [
    Observation("1.1.1.1", 80, "HTTP", NOW - 10, "r1"),
    Observation("1.1.1.1", 22, "SSH", NOW - 2 * 3600, "r2"),
    Observation("1.1.1.200", 53, "DNS", NOW - 3 * 86_400, "r3"),
    Observation("1.1.10.5", 80, "HTTP", NOW - 60, "r4"),
    Observation("1.1.0.9", 443, "HTTP", NOW - 30, "r5"),
    Observation("2001:db8::1", 443, "HTTP", NOW - 20, "r6"),
    Observation("2001:db9::1", 8080, "HTTP", NOW - 40, "r7"),
]


@pytest.fixture
def seeded_url(migrated_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    engine = open_engine(migrated_url)
    Repository(engine).upsert_many(SEED)
    # A later scan of a seeded key: first_seen stays, last_scanned moves on.
    Repository(engine).upsert_many([Observation("1.1.1.1", 80, "HTTP", NOW - 5, "r1b")])
    engine.dispose()
    monkeypatch.setenv("DATABASE_URL", migrated_url)
    return migrated_url


def services_json(capsys: pytest.CaptureFixture[str], *flags: str) -> list[dict]:
    assert services_main(["--json", *flags]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def ips(rows: list[dict]) -> list[str]:
    return [row["ip"] for row in rows]


def test_services_lists_every_row_newest_scan_first(seeded_url, capsys) -> None:
    rows = services_json(capsys)

    assert len(rows) == len(SEED)
    assert [row["response"] for row in rows] == ["r1b", "r6", "r5", "r7", "r4", "r2", "r3"]
    newest = rows[0]
    assert newest == {
        "ip": "1.1.1.1",
        "port": 80,
        "service": "HTTP",
        "last_scanned": dt.datetime.fromtimestamp(NOW - 5, dt.UTC).isoformat(),
        "first_seen": dt.datetime.fromtimestamp(NOW - 10, dt.UTC).isoformat(),
        "response": "r1b",
    }


def test_an_exact_ip_selects_that_host_only(seeded_url, capsys) -> None:
    assert sorted(ips(services_json(capsys, "--ip", "1.1.1.1"))) == ["1.1.1.1", "1.1.1.1"]
    assert ips(services_json(capsys, "--ip", "2001:0db8:0:0::1")) == ["2001:db8::1"]
    assert ips(services_json(capsys, "--ip", "::ffff:1.1.1.200")) == ["1.1.1.200"]


@pytest.mark.parametrize(
    ("network", "expected"),
    [
        ("1.1.1.0/24", ["1.1.1.1", "1.1.1.1", "1.1.1.200"]),
        ("1.1.0.0/23", ["1.1.0.9", "1.1.1.1", "1.1.1.1", "1.1.1.200"]),
        ("1.1.1.128/25", ["1.1.1.200"]),
        ("1.1.0.0/16", ["1.1.0.9", "1.1.1.1", "1.1.1.1", "1.1.1.200", "1.1.10.5"]),
        ("2001:db8::/32", ["2001:db8::1"]),
        ("2001:db8::/31", ["2001:db8::1", "2001:db9::1"]),
        ("1.1.1.1/32", ["1.1.1.1", "1.1.1.1"]),
    ],
)
def test_a_cidr_selects_the_hosts_inside_the_network(seeded_url, capsys, network, expected):
    assert sorted(ips(services_json(capsys, "--ip", network))) == expected


def test_a_cidr_limit_counts_matching_rows_only(seeded_url, capsys) -> None:
    rows = services_json(capsys, "--ip", "1.1.1.0/24", "--sort", "-first_seen", "--limit", "2")

    assert [row["response"] for row in rows] == ["r1b", "r2"]


def test_port_and_case_insensitive_service_filters(seeded_url, capsys) -> None:
    assert sorted(ips(services_json(capsys, "--port", "443"))) == ["1.1.0.9", "2001:db8::1"]
    assert ips(services_json(capsys, "--service", "ssh")) == ["1.1.1.1"]
    assert ips(services_json(capsys, "--service", "http", "--port", "8080")) == ["2001:db9::1"]


def test_since_takes_durations_and_iso_times(seeded_url, capsys) -> None:
    # NOW was read when this module was imported, maybe many minutes ago in a long run.
    minutes_since_now = int(time.time() - NOW) // 60
    assert len(services_json(capsys, "--since", f"{15 + minutes_since_now}m")) == 5
    assert len(services_json(capsys, "--since", "1d")) == 6
    assert len(services_json(capsys, "--since", "7d")) == 7
    two_days_ago = dt.datetime.fromtimestamp(NOW - 2 * 86_400, dt.UTC).replace(tzinfo=None)
    assert len(services_json(capsys, "--since", two_days_ago.isoformat())) == 6


def test_sort_and_limit(seeded_url, capsys) -> None:
    by_port = services_json(capsys, "--sort", "port", "--limit", "3")
    by_port_desc = services_json(capsys, "--sort", "-port", "--limit", "1")

    assert [row["port"] for row in by_port] == [22, 53, 80]
    assert [row["port"] for row in by_port_desc] == [8080]
    oldest_first = services_json(capsys, "--sort", "first_seen", "--limit", "1")
    assert [row["response"] for row in oldest_first] == ["r3"]


def test_csv_has_a_header_and_one_row_per_service(seeded_url, capsys) -> None:
    assert services_main(["--csv", "--service", "HTTP", "--sort", "ip"]) == 0

    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["ip"] for row in rows] == [
        "1.1.0.9",
        "1.1.1.1",
        "1.1.10.5",
        "2001:db8::1",
        "2001:db9::1",
    ]
    assert rows[1]["port"] == "80"
    assert rows[1]["response"] == "r1b"


def test_the_default_output_is_a_table_of_the_rows(seeded_url, capsys) -> None:
    assert services_main(["--ip", "1.1.1.200"]) == 0

    out = capsys.readouterr().out
    assert "1 services" in out
    assert "1.1.1.200" in out
    assert "r3" in out


def test_stats_counts_rows_per_service_and_the_scan_range(seeded_url, capsys) -> None:
    assert stats_main(["--json"]) == 0

    stats = json.loads(capsys.readouterr().out)
    assert stats == {
        "rows": 7,
        "per_service": {"DNS": 1, "HTTP": 5, "SSH": 1},
        "newest_scan": dt.datetime.fromtimestamp(NOW - 5, dt.UTC).isoformat(),
        "oldest_scan": dt.datetime.fromtimestamp(NOW - 3 * 86_400, dt.UTC).isoformat(),
        "updated_last_minute": 7,
    }


def test_stats_table_names_every_service(seeded_url, capsys) -> None:
    assert stats_main([]) == 0

    out = capsys.readouterr().out
    assert "rows HTTP" in out
    assert "rows DNS" in out


def test_stats_of_an_empty_table(migrated_url, capsys) -> None:
    assert stats_main(["--json", "--database-url", migrated_url]) == 0

    stats = json.loads(capsys.readouterr().out)
    assert stats["rows"] == 0
    assert stats["per_service"] == {}
    assert stats["newest_scan"] is None


def test_a_missing_database_file_is_one_line_and_exit_1(tmp_path, capsys) -> None:
    url = f"sqlite:///{tmp_path / 'nothing-here.db'}"

    assert services_main(["--database-url", url]) == 1
    assert stats_main(["--database-url", url]) == 1

    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert "does not exist" in err[0]
    assert not (tmp_path / "nothing-here.db").exists()


def test_a_missing_table_is_one_line_and_exit_1(any_database_url, capsys) -> None:
    engine = open_engine(any_database_url)  # the database exists, the table does not
    with engine.connect():
        pass
    engine.dispose()

    assert services_main(["--database-url", any_database_url]) == 1

    err = capsys.readouterr().err.splitlines()
    assert err == [
        "mini-scan services: error: table services does not exist: run `mini-scan migrate` first"
    ]


@pytest.mark.parametrize(
    "flags",
    [
        ["--ip", "1.1.1.300"],
        ["--ip", "1.1.1.0/33"],
        ["--port", "70000"],
        ["--since", "yesterday"],
        ["--sort", "response"],
        ["--limit", "0"],
        ["--json", "--csv"],
    ],
)
def test_a_bad_flag_value_is_one_line_and_exit_2(flags, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        services_main(flags)

    assert exited.value.code == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_a_malformed_database_url_is_one_line_and_exit_2(capsys) -> None:
    assert stats_main(["--database-url", "not a url"]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1
