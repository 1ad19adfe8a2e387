"""Logs: the configuration every role shares (emulator/logs.py: JSON lines with `severity`, the
libraries' loggers through the same renderer), and the helpers that keep secrets and strangers'
payloads out of them."""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog
from sqlalchemy.engine import make_url

from emulator.logs import add_severity, configure_logging

__all__ = ["add_severity", "configure_logging", "excerpt", "redact_url", "supervised_thread"]

_log = structlog.get_logger("processor.runtime.logs")
MAX_LOGGED_CHARS = 200  # payload excerpts and error texts in logs are cut to this


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
