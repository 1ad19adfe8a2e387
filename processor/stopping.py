"""SIGTERM and SIGINT as a request to stop: the handlers every command installs, the exception that
ends a start-up wait, and the exit code of a command stopped before its job was done.

The rule (docs/operations.md, "Stopping"): a command that runs until it is stopped (`up`, `process`,
`scan`, `emulator`) exits 0 after a stop at any moment, start-up waits included; a command that does
a job and ends (`setup`, `dlq`, ...) exits 128 + the signal (130 for SIGINT, 143 for SIGTERM) when
stopped before the job was done, so a script or compose's `service_completed_successfully` never
takes a half-done job for a done one. Imports only the standard library: it must be installed before
the heavy imports.
"""

from __future__ import annotations

import queue
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """A stop was requested (SIGTERM or SIGINT) before what was being waited for arrived."""


class StopRequest(threading.Event):
    """Set by the first SIGTERM or SIGINT; remembers which, for the exit code."""

    signal_number: int = 0

    def request(self, signum: int) -> None:
        self.signal_number = self.signal_number or signum
        self.set()

    def exit_code(self) -> int:
        """128 + the signal, as a shell reports a process that signal ended."""
        return 128 + (self.signal_number or signal.SIGTERM)


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """A stop request that SIGTERM and SIGINT set while the block runs; the previous handlers
    come back after it. Handlers live in the main thread: elsewhere (a command run in a test's
    thread) the caller sets the request itself.

    The handler runs in the main thread wherever it is, possibly inside `stop.wait()` holding
    the request's lock: setting the request there would wait on that lock forever. So the
    handler only puts the signal on a queue (whose `put` is reentrant) and a thread of its own
    sets the request."""
    stop = StopRequest()
    if not _in_main_thread():
        yield stop
        return
    signals: queue.SimpleQueue[int] = queue.SimpleQueue()

    def relay() -> None:
        while signum := signals.get():
            stop.request(signum)

    threading.Thread(target=relay, name="stop-signals", daemon=True).start()
    try:
        with _handlers(lambda signum, _frame: signals.put(signum)):
            yield stop
    finally:
        signals.put(0)  # ends the relay


@contextmanager
def exit_on_signals(code: int | None) -> Iterator[None]:
    """While the block runs and until the command installs its own handlers (Python importing
    it takes seconds on a busy machine), a stop ends the process at once with `code` (None:
    128 + the signal), not with a traceback or a kill: nothing has started, nothing to clean up."""

    def leave(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum if code is None else code)

    with _handlers(leave) if _in_main_thread() else nullcontext():
        yield


@contextmanager
def _handlers(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
