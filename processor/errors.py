"""The errors mini-scan raises on purpose. Each is one line fit for a terminal; the command line
catches `MiniScanError` once and exits with its `exit_code`."""

from __future__ import annotations


class MiniScanError(Exception):
    """Base of every error the project raises on purpose; its message is one line."""

    exit_code = 1


class ConfigError(MiniScanError):
    """Invalid configuration (a setting or a flag)."""

    exit_code = 2


class StartupError(MiniScanError):
    """A dependency did not appear in time."""


class PubSubError(MiniScanError):
    """Pub/Sub answered a command's request with an error (first line of it)."""


class QueryError(MiniScanError):
    """The database cannot answer a query (missing file or table, unreachable)."""


class DataDirError(MiniScanError):
    """The data directory or a database file cannot be prepared; the message says what to run."""


class ExactlyOnceDelivery(MiniScanError):
    """The subscription has exactly-once delivery on, which the batch consumer does not support."""


class TableRefuses(MiniScanError):
    """The database refuses rows because of the table (a constraint or a type changed under
    us), not because of the rows: an outage, retried; nothing is dead-lettered."""

    def __init__(self, why: str, error: str) -> None:
        super().__init__(f"{why}: {error}")
        self.why, self.error = why, error


class StopRetrying(MiniScanError):
    """The process is shutting down while the database is still unavailable."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(exc)
    return text.splitlines()[0] if text.strip() else type(exc).__name__
