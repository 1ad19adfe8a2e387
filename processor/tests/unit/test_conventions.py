"""What operators' tools expect of any service: `--version`, every log line (the libraries' too)
as one JSON object with a `severity` Cloud Logging reads, and metrics without `_created` series
but with a build-info gauge."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from processor import version
from processor.cli import main
from processor.runtime.logs import configure_logging
from processor.runtime.metrics import Metrics


@pytest.fixture
def json_logs() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers, root.level
    configure_logging("INFO", "json")
    yield
    root.handlers, root.level = handlers, level
    structlog.reset_defaults()


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_prints_the_installed_version(flag: str, capsys) -> None:
    assert main([flag]) == 0

    assert capsys.readouterr().out == f"mini-scan {version()}\n"
    assert version() != "unknown"


def test_a_librarys_log_line_is_json_with_severity(json_logs, capsys) -> None:
    # Catches: no stdlib handler (the line went to stderr as plain text, or not at all).
    logging.getLogger("google.api_core.bidi").warning("stream %s closed", "x")

    (line,) = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    assert record["event"] == "stream x closed"
    assert record["logger"] == "google.api_core.bidi"
    assert (record["level"], record["severity"]) == ("warning", "WARNING")
    assert "timestamp" in record


def test_library_info_chatter_stays_out_at_info(json_logs, capsys) -> None:
    logging.getLogger("alembic.runtime.migration").info("Context impl SQLiteImpl.")

    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    ("method", "severity"), [("info", "INFO"), ("warning", "WARNING"), ("error", "ERROR")]
)
def test_our_log_lines_carry_severity(json_logs, capsys, method: str, severity: str) -> None:
    getattr(structlog.get_logger("processor.test"), method)("event_name", batch=3)

    record = json.loads(capsys.readouterr().out)
    assert (record["event"], record["severity"]) == ("event_name", severity)


def test_metrics_have_no_created_series_and_a_build_info_gauge() -> None:
    metrics = Metrics()
    metrics.acked.inc()
    metrics.batch_size.observe(3)

    text = metrics.render().decode()

    assert "_created" not in text
    assert f'version="{version()}"' in text
    assert "mini_scan_build_info{" in text
    assert "mini_scan_messages_acked_total 1.0" in text
