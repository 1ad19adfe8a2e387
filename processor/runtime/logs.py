"""Logs: structlog's JSON lines (or a console renderer on a terminal), and the helpers that keep
secrets and strangers' payloads out of them."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

import structlog
from sqlalchemy.engine import make_url

MAX_LOGGED_CHARS = 200  # payload excerpts and error texts in logs are cut to this


def configure_logging(level: str = "INFO", log_format: str | None = None) -> None:
    """JSON lines for machines, or a console renderer on a terminal; one line per event."""
    if log_format is None:
        log_format = "console" if sys.stdout.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer()
        if log_format == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )


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
            structlog.get_logger("processor.runtime.logs").exception("thread_died", thread=name)
            raise

    return threading.Thread(target=run, name=name, daemon=True)
