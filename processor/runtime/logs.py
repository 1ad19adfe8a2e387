"""Logs: structlog's JSON lines (or a console renderer on a terminal), the standard library's
loggers (google, grpc, alembic, sqlalchemy) sent through the same renderer, and the helpers that
keep secrets and strangers' payloads out of them."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

import structlog
from sqlalchemy.engine import make_url

_log = structlog.get_logger("processor.runtime.logs")
MAX_LOGGED_CHARS = 200  # payload excerpts and error texts in logs are cut to this


# Cloud Logging reads a JSON line's `severity` (anything else shows as DEFAULT).
_SEVERITY = {"warn": "WARNING", "exception": "ERROR", "fatal": "CRITICAL"}


def add_severity(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """`severity` beside `level`: the same level, in the name Cloud Logging reads."""
    level = str(event.get("level", "info"))
    event["severity"] = _SEVERITY.get(level, level.upper())
    return event


class _Stdout(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler writing to whatever `sys.stdout` is when a line is written (as structlog's
    PrintLogger does), not the stream there was at configuration time."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


def configure_logging(level: str = "INFO", log_format: str | None = None) -> None:
    """JSON lines for machines, or a console renderer on a terminal; one line per event, ours
    and the libraries' alike, each with `level` and `severity`."""
    if log_format is None:
        log_format = "console" if sys.stdout.isatty() else "json"
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
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
    handler = _Stdout()
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


def redact_url(url: str) -> str:
    """A database URL fit for logs: the password replaced by ***."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparseable URL may hold a secret anywhere: show nothing of it
        return "<unparseable database URL>"


def excerpt(text: str | bytes, limit: int = MAX_LOGGED_CHARS) -> str:
    """At most `limit` characters of a payload or error, marked when cut."""
    if isinstance(text, bytes):
        text = text[: limit * 4].decode("utf-8", "replace")
    return text if len(text) <= limit else text[:limit] + f"...(+{len(text) - limit} chars)"


def supervised_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """A daemon thread running `target` whose death by an exception is logged once, with the
    exception (`thread_died`), before it ends: its owner's `alive()` then fails /healthz."""

    def run() -> None:
        try:
            target()
        except BaseException:
            _log.exception("thread_died", thread=name)
            raise

    return threading.Thread(target=run, name=name, daemon=True)
