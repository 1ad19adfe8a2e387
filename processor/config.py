"""Configuration from the environment (a contract: compose and tools set these) or CLI flags.

Each setting is read when a command's `main()` runs, never at import time. A flag overrides its
environment variable; an invalid value is a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from processor.errors import ConfigError
from processor.schema import DEFAULT_MAX_MESSAGE_BYTES

# The same as processor.storage.DEFAULT_DATABASE_URL (a test holds them equal): a literal, so
# that commands which never open a database (scan, dlq, setup) do not import SQLAlchemy.
DEFAULT_DATABASE_URL = "sqlite:///data/scan_results.db"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`--help` still shows the usage)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


class PubSubSettings(BaseSettings):
    """Where the scan stream lives; shared by every command."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    pubsub_emulator_host: str | None = Field(
        None, description="host:port of a Pub/Sub emulator; unset means real Google Cloud Pub/Sub"
    )
    pubsub_project_id: str | None = Field(
        None,
        min_length=1,
        description="Google Cloud project (default: GOOGLE_CLOUD_PROJECT; then test-project with "
        "an emulator; then the project of the Google credentials)",
    )
    pubsub_topic: str = Field(
        "scan-topic", min_length=1, description="topic the scanner publishes to"
    )
    pubsub_subscription: str = Field("scan-sub", min_length=1, description="subscription consumed")
    pubsub_dead_letter_topic: str = Field(
        "scan-dlq", min_length=1, description="topic rejected messages are published to"
    )
    pubsub_dead_letter_subscription: str = Field(
        "scan-dlq-sub", min_length=1, description="subscription keeping dead letters for replay"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="DEBUG, INFO, WARNING or ERROR"
    )
    log_format: Literal["json", "console"] | None = Field(
        None, description="json or console (default: console on a terminal, JSON otherwise)"
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def project(self) -> str:
        """PUBSUB_PROJECT_ID, or `default_project`'s answer, looked up when a Pub/Sub name is
        first needed: a command that never names one (datadir, a flag error) asks no
        credentials."""
        if self.pubsub_project_id is None:
            host = self.pubsub_emulator_host or os.environ.get("PUBSUB_EMULATOR_HOST")
            self.pubsub_project_id = default_project(host)
        return self.pubsub_project_id

    def apply_emulator_host(self) -> None:
        """The Google client reads PUBSUB_EMULATOR_HOST itself: a flag must reach it too."""
        if self.pubsub_emulator_host:
            os.environ["PUBSUB_EMULATOR_HOST"] = self.pubsub_emulator_host

    @property
    def topic_path(self) -> str:
        return f"projects/{self.project}/topics/{self.pubsub_topic}"

    @property
    def subscription_path(self) -> str:
        return f"projects/{self.project}/subscriptions/{self.pubsub_subscription}"

    @property
    def dead_letter_topic_path(self) -> str:
        return f"projects/{self.project}/topics/{self.pubsub_dead_letter_topic}"

    @property
    def dead_letter_subscription_path(self) -> str:
        name = self.pubsub_dead_letter_subscription
        return f"projects/{self.project}/subscriptions/{name}"


def default_project(emulator_host: str | None) -> str:
    """The project when PUBSUB_PROJECT_ID is not set: GOOGLE_CLOUD_PROJECT, then the emulators'
    usual test-project, then the project of the credentials (google.auth is imported only then;
    missing credentials raise its DefaultCredentialsError, which the command line explains)."""
    if project := os.environ.get("GOOGLE_CLOUD_PROJECT"):
        return project
    if emulator_host:
        return "test-project"
    import google.auth

    _, project = google.auth.default()
    if not project:
        raise ConfigError("no Google Cloud project: set PUBSUB_PROJECT_ID or GOOGLE_CLOUD_PROJECT")
    return str(project)


class DatabaseSettings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore")

    database_url: str = Field(
        DEFAULT_DATABASE_URL,
        description="SQLAlchemy URL: sqlite:///path or postgresql://user:password@host/db",
    )
    database_url_file: str | None = Field(
        None,
        description="file holding DATABASE_URL (a mounted secret), instead of DATABASE_URL",
    )

    @model_validator(mode="after")
    def _read_database_url_file(self) -> DatabaseSettings:
        """The URL from DATABASE_URL_FILE: a password in a file stays out of the environment
        (inherited by children, shown by `docker inspect`) and out of `ps`. Errors name the file,
        never its content."""
        path = self.database_url_file
        if not path:
            return self
        if self.database_url and "database_url" in self.model_fields_set:  # empty: unset
            raise ConfigError("DATABASE_URL and DATABASE_URL_FILE are both set: set only one")
        try:
            url = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"cannot read DATABASE_URL_FILE {path}: {reason}") from None
        if not url:
            raise ConfigError(f"DATABASE_URL_FILE {path} is empty")
        self.database_url = url
        return self

    def database_environment(self) -> dict[str, str]:
        """The variables that hand this database to a child process: the file's path when the
        URL came from one, so the secret is never copied into an environment."""
        if self.database_url_file:
            return {"DATABASE_URL_FILE": self.database_url_file}
        return {"DATABASE_URL": self.database_url}


class ProcessorSettings(PubSubSettings, DatabaseSettings):
    """Everything `mini-scan process` reads."""

    metrics_port: int = Field(
        9100, ge=0, le=65535, description="port of /metrics, /healthz and /readyz (0: off)"
    )
    metrics_host: str = Field("127.0.0.1", description="bind address of the metrics server")
    consumer: Literal["batch", "client"] = Field(
        "batch",
        description="batch: streaming pull taken a response at a time (default); "
        "client: the client library's subscribe() callbacks",
    )
    streams: int = Field(2, ge=1, le=32, description="streaming pulls per process")
    callback_threads: int = Field(
        1, ge=1, le=64, description="threads per stream running the (non-blocking) callback"
    )
    max_messages: int = Field(
        1000, ge=1, description="flow control: messages held per stream, unacked"
    )
    max_bytes: int = Field(
        10 * 1024 * 1024,
        ge=1024,
        description="flow control: bytes held per stream, unacked (with the batch consumer, "
        "decoded responses count too)",
    )
    lease_seconds: int = Field(
        20,
        ge=10,
        le=600,
        description="lease per extension: how soon a crashed processor's messages come back",
    )
    max_lease_seconds: int = Field(
        3600,
        ge=1,
        description="longest a message waits for a commit; past it, in a database outage, the "
        "processor hands back all but the batch it retries and pauses its streams",
    )
    batch_size: int = Field(1000, ge=1, le=10_000, description="rows per transaction, at most")
    batch_max_wait_ms: int = Field(
        50, ge=1, le=60_000, description="oldest message's wait before its batch is flushed"
    )
    max_skew_seconds: int = Field(
        3600, ge=0, description="how far in the future a scan timestamp may be"
    )
    max_message_bytes: int = Field(
        DEFAULT_MAX_MESSAGE_BYTES,
        ge=1024,
        description="larger messages are dead-lettered unparsed (message_too_large)",
    )
    database_timeout: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="seconds a database call may go unanswered before it fails and is retried "
        "as an outage (PostgreSQL connect, statement and network timeouts; SQLite's busy timeout)",
    )
    writer_stall_seconds: float = Field(
        120.0,
        gt=0,
        description="/healthz fails when messages wait and the writer has completed no attempt "
        "for this long (keep it above 2 x DATABASE_TIMEOUT + 11)",
    )
    startup_timeout: float = Field(
        60.0, gt=0, description="seconds to wait for the subscription and the database at start"
    )
    migrate: bool = Field(
        True,
        description="bring the schema to the newest revision at start; off: wait for "
        "`mini-scan migrate` to have done it (a role without DDL rights)",
    )
    shutdown_grace: float = Field(
        10.0, gt=0, description="seconds SIGTERM allows to flush, ack and exit"
    )


class SetupSettings(PubSubSettings):
    """What `mini-scan setup` creates the subscription with."""

    startup_timeout: float = Field(
        60.0, gt=0, description="seconds to wait for the Pub/Sub service to answer"
    )
    ack_deadline_seconds: int = Field(60, ge=10, le=600, description="subscription ack deadline")
    max_delivery_attempts: int = Field(
        20, ge=5, le=100, description="deliveries before Pub/Sub itself dead-letters a message"
    )
    min_retry_backoff: float = Field(1.0, ge=0, le=600, description="retry policy minimum, s")
    max_retry_backoff: float = Field(60.0, ge=0, le=600, description="retry policy maximum, s")


S = TypeVar("S", bound=BaseSettings)


def add_arguments(parser: argparse.ArgumentParser, settings_class: type[BaseSettings]) -> None:
    """One `--flag` per setting, its environment variable and default in the help."""
    group = parser.add_argument_group("settings (flag or environment variable)")
    for name, field in settings_class.model_fields.items():
        default = "" if field.default is None else f"; default {field.default}"
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=None,
            metavar=name.upper(),
            help=f"{field.description} [env {name.upper()}{default}]",
        )


def load(settings_class: type[S], args: argparse.Namespace | None = None) -> S:
    """Settings from the environment, overridden by the flags given; ConfigError if invalid."""
    flags = {
        name: value
        for name in settings_class.model_fields
        if (value := getattr(args, name, None)) is not None
    }
    try:
        return settings_class(**flags)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        name = str(error["loc"][0]) if error["loc"] else "settings"
        raise ConfigError(f"invalid {name.upper()}: {error['msg']}") from None
