"""Waiting at start-up for the services a command needs (Pub/Sub, the database): with backoff,
a deadline, and an ear for a stop."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import structlog
import tenacity

from processor.errors import StartupError, first_line
from processor.stopping import Stopped

_log = structlog.get_logger("processor.runtime.dependencies")
T = TypeVar("T")


def wait_for(
    what: str, attempt: Callable[[], T], timeout: float, stop: threading.Event | None = None
) -> T:
    """Call `attempt` until it succeeds, with backoff, for at most `timeout` seconds; raises
    `Stopped` as soon as `stop` is set between attempts (a stop never waits out the timeout)."""
    stop = stop or threading.Event()

    def log_retry(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        _log.warning(
            "waiting_for_dependency",
            dependency=what,
            attempt=state.attempt_number,
            error=first_line(error) if error else "",
        )

    if stop.is_set():
        raise Stopped(f"stopped before {what} was available")
    try:
        return tenacity.Retrying(
            stop=tenacity.stop_after_delay(timeout) | tenacity.stop_when_event_set(stop),
            wait=tenacity.wait_exponential_jitter(multiplier=0.2, max=5.0, jitter=0.2),
            sleep=stop.wait,
            before_sleep=log_retry,
            reraise=True,
        )(attempt)
    except Exception as exc:
        if stop.is_set():
            raise Stopped(f"stopped while waiting for {what}") from exc
        raise StartupError(f"{what} not available after {timeout:g}s: {first_line(exc)}") from exc
