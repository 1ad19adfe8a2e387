"""Hostile stored values and dead letters reach an operator's terminal, spreadsheet or pipe as
data: every human-facing output of `services`, `stats`, `dlq list` and `up`'s view exits 0 with
no traceback, no markup applied and no raw control byte; `--csv` quotes formulas; `--json` stays
exact."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time

import pytest
from rich.console import Console

from processor.commands.inert import cell, csv_cell, escape_controls
from processor.commands.query import services_main, stats_main
from processor.schema import Observation
from processor.storage import Repository, open_engine
from processor.tests.helpers.hostile import FORMULA, HOSTILE, RAW_CONTROL, assert_inert

NOW = int(time.time())


@pytest.fixture
def hostile_url(migrated_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    engine = open_engine(migrated_url)
    Repository(engine).upsert_many(
        [
            Observation("1.1.1.1", 80, "[/X]", NOW - 10, HOSTILE),
            Observation("1.1.1.2", 443, "HTTP", NOW - 20, FORMULA),
        ]
    )
    engine.dispose()
    monkeypatch.setenv("DATABASE_URL", migrated_url)
    monkeypatch.setenv("COLUMNS", "400")  # one table row per line, escapes unbroken
    return migrated_url


def test_services_table_shows_a_hostile_banner_as_escaped_text(hostile_url, capsys) -> None:
    # Catches: str cells again (markup parsed: MarkupError, exit with a traceback), or cells
    # without escape_controls (the ESC and C1 bytes reach the terminal).
    assert services_main([]) == 0

    out = capsys.readouterr().out
    assert_inert(out)
    assert "\\x1b[2J" in out  # shown, escaped
    assert "[/x] [link=https://evil.example]click[/link] [bold red]red[/] :skull:" in out
    assert "\\x1b]52;c;ZXZpbA==\\x07" in out
    assert "\\x9b31m \\u202e\\x7f\\r\\n" in out


def test_stats_table_shows_a_hostile_service_name_as_text(hostile_url, capsys) -> None:
    assert stats_main([]) == 0

    out = capsys.readouterr().out
    assert_inert(out)
    assert "rows [/X]" in out


def test_csv_quotes_formula_cells_and_keeps_the_rest(hostile_url, capsys) -> None:
    assert services_main(["--csv", "--sort", "ip"]) == 0

    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["response"] for row in rows] == [HOSTILE, "'" + FORMULA]


def test_json_keeps_hostile_values_exact_and_escaped(hostile_url, capsys) -> None:
    assert services_main(["--json", "--sort", "ip"]) == 0

    out = capsys.readouterr().out
    assert not RAW_CONTROL.search(out)
    assert [json.loads(line)["response"] for line in out.splitlines()] == [HOSTILE, FORMULA]


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x1b[31m", "\\x1b[31m"),
        ("a\nb\tc", "a\\nb\\tc"),
        ("\x00\x7f\x85\x9b", "\\x00\\x7f\\x85\\x9b"),
        ("\u2028\u202e\u2066", "\\u2028\\u202e\\u2066"),
        ("é 中 [b]", "é 中 [b]"),
    ],
)
def test_control_characters_are_escaped_and_the_rest_kept(raw: str, shown: str) -> None:
    assert escape_controls(raw) == shown


def test_a_cell_is_never_parsed_as_markup() -> None:
    console = Console(record=True, width=200, color_system=None)
    console.print(cell("[link=https://evil.example]x[/link] [/x]"))

    assert console.export_text().strip() == "[link=https://evil.example]x[/link] [/x]"


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_every_formula_start_is_quoted(start: str) -> None:
    assert csv_cell(start + "1+1") == "'" + start + "1+1"
    assert csv_cell(80) == 80
    assert csv_cell("1.1.1.1") == "1.1.1.1"


def test_ups_view_shows_a_host_with_markup_as_text(tmp_path) -> None:
    # Catches: the header passed to rich as a str (the "[/x]" ends in MarkupError).
    from processor.commands.up import Child, UpSettings, _View

    host = "[/x]\x1b[2J:8085"
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(timeout=30)
    view = _View(UpSettings(), host, [Child("scanner", process)], tmp_path)
    console = Console(record=True, width=400, color_system=None, file=io.StringIO())

    console.print(view.render(1.0))

    out = console.export_text()
    assert_inert(out)
    assert "emulator [/x]\\x1b[2J:8085" in out
