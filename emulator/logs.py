"""The log conventions of every mini-scan role (processor, scanner, emulator): structlog's JSON
lines, or a console renderer on a terminal, each with a `severity` Cloud Logging reads, and the
standard library's loggers (google, grpc, alembic, sqlalchemy) sent through the same renderer.

Here rather than in processor/ because the emulator depends on nothing of the processor's;
processor.runtime.logs re-exports it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

# Cloud Logging reads a JSON line's `severity` (anything else shows as DEFAULT).
_SEVERITY = {"warn": "WARNING", "exception": "ERROR", "fatal": "CRITICAL"}


def add_severity(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """`severity` beside `level`: the same level, in the name Cloud Logging reads."""
    level = str(event.get("level", "info"))
    event["severity"] = _SEVERITY.get(level, level.upper())
    return event


class _Stream(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler writing to whatever `sys.stdout` (or `sys.stderr`) is when a line is written,
    not the stream there was at configuration time (so a test's capture sees it)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


def configure_logging(
    level: str = "INFO", log_format: str | None = None, stream: str = "stdout"
) -> None:
    """JSON lines for machines, or a console renderer on a terminal; one line per event, ours
    and the libraries' alike, each with `level` and `severity`, on `sys.<stream>`."""
    if log_format is None:
        log_format = "console" if getattr(sys, stream).isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer()
        if log_format == "console"
        else structlog.processors.JSONRenderer()
    )
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            add_severity,
            stamp,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(getattr(sys, stream)),
        cache_logger_on_first_use=False,
    )
    handler = _Stream(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                add_severity,
                stamp,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    # Libraries at WARNING and above (alembic's and grpc's INFO lines are start-up chatter),
    # everything at DEBUG.
    root.setLevel(logging.DEBUG if level == "DEBUG" else max(logging.WARNING, _level(level)))
    # google-api-core turns the "google" logger's propagation off when the first client is made,
    # unless that logger is configured already: a level of its own (the root's) marks it so, and
    # its lines keep reaching the handler above.
    google = logging.getLogger("google")
    google.setLevel(root.level)
    google.propagate = True


def _level(name: str) -> int:
    return int(logging.getLevelName(name))
