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
from processor.config import PubSubSettings
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


def test_google_lines_still_reach_the_formatter_once_a_client_has_set_up_its_logging(
    json_logs, capsys
) -> None:
    # Catches: the "google" logger left unconfigured, which google-api-core then stops from
    # propagating when the first client is made (as it does in every processor).
    from google.api_core import client_logging

    client_logging.setup_logging("")
    logging.getLogger("google.cloud.pubsub_v1.subscriber").warning("lease %s lost", "y")

    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["event"] == "lease y lost"


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


@pytest.fixture
def no_project(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("PUBSUB_PROJECT_ID", "GOOGLE_CLOUD_PROJECT", "PUBSUB_EMULATOR_HOST"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_project_is_the_setting_then_google_cloud_project(no_project) -> None:
    no_project.setenv("GOOGLE_CLOUD_PROJECT", "real-project")
    assert PubSubSettings().topic_path == "projects/real-project/topics/scan-topic"
    no_project.setenv("PUBSUB_PROJECT_ID", "chosen")
    assert PubSubSettings().project == "chosen"


def test_with_an_emulator_and_nothing_set_the_project_is_test_project(no_project) -> None:
    no_project.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:8085")
    assert PubSubSettings().project == "test-project"


def test_on_real_pubsub_the_project_comes_from_the_credentials(no_project, tmp_path) -> None:
    # Catches: test-project on real Pub/Sub (the old default), where no such project is ours.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    account = {
        "type": "service_account",
        "project_id": "from-credentials",
        "private_key_id": "1",
        "private_key": pem,
        "client_email": "mini-scan@from-credentials.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    path = tmp_path / "account.json"
    path.write_text(json.dumps(account))
    no_project.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))

    assert PubSubSettings().project == "from-credentials"


def test_up_starts_its_own_emulator_so_needs_no_credentials_for_a_project(no_project) -> None:
    from processor.commands.up import UpSettings

    no_project.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/account.json")
    assert UpSettings().project == "test-project"
