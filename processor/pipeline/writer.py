"""Commits batches and acks their messages: the one place that decides ack, nack or dead-letter
for a decoded message.

- Transient database errors (anything but a refused value) are retried with exponential backoff
  and jitter, for as long as it takes, while the client keeps the messages' leases. A call the
  database leaves unanswered past DATABASE_TIMEOUT (+1 s) is such an error: the watchdog reports
  the outage at once and ends the call.
- A batch the database refuses is split until the refused rows are found; they are
  dead-lettered as `storage_rejected` and the rest is committed. Unless the table is at fault:
  when it refuses a known-good row too (the canary), or most rows of a batch of at least
  MAJORITY_MIN_ROWS, that is an outage of the table, retried like any other, and nothing is
  dead-lettered.
- A message is acked only after the transaction holding its row has committed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import sqlalchemy as sa
import structlog
import tenacity

from processor.errors import first_line
from processor.pipeline.batcher import Batcher
from processor.pipeline.deadletter import DeadLetters
from processor.pipeline.messages import Held
from processor.pipeline.source import Acknowledger
from processor.runtime.logs import excerpt
from processor.runtime.metrics import Metrics
from processor.schema import Reason
from processor.storage import Repository, UpsertResult

_log = structlog.get_logger("processor.pipeline.writer")
T = TypeVar("T")

# Refusals of most of a batch's rows are the table's fault, not the rows', from this many
# distinct rows up; in a smaller batch a few bad rows could be most of it.
MAJORITY_MIN_ROWS = 10
# The database's own timeouts (statement, connect, TCP) are DATABASE_TIMEOUT; the watchdog
# steps in this much later, so that the database's error, when it comes, comes first.
WATCHDOG_GRACE_SECONDS = 1.0
WATCH_INTERVAL_SECONDS = 0.25
_NOTHING = UpsertResult(0, 0, 0)


class StopRetrying(Exception):
    """The process is shutting down while the database is still unavailable."""


class TableRefuses(Exception):
    """The database refuses rows because of the table (a constraint or a type changed under
    us), not because of the rows: an outage, retried; nothing is dead-lettered."""

    def __init__(self, why: str, error: str) -> None:
        super().__init__(f"{why}: {error}")
        self.why, self.error = why, error


def is_refused_value(exc: BaseException) -> bool:
    """A row the database will never accept (a constraint, a value the dialect cannot store),
    as opposed to a database that is unavailable for now."""
    if isinstance(exc, sa.exc.IntegrityError | sa.exc.DataError):
        return True
    # A driver refusing to encode a value raises before any SQL runs.
    original = getattr(exc, "orig", exc)
    return isinstance(original, UnicodeError | ValueError) and not isinstance(
        original, sa.exc.OperationalError
    )


class Writer:
    """The single writer thread: takes batches from the batcher, commits them, acks them; and
    its watchdog, which ends a database call left unanswered."""

    def __init__(
        self,
        batcher: Batcher,
        repository: Repository,
        dead_letters: DeadLetters,
        acks: Acknowledger,
        metrics: Metrics,
        max_backoff: float = 10.0,
        database_timeout: float = 30.0,
        stall_seconds: float = 120.0,
    ) -> None:
        self._batcher = batcher
        self._repository = repository
        self._dead_letters = dead_letters
        self._acks = acks
        self._metrics = metrics
        self._max_backoff = max_backoff
        self._answer_within = database_timeout + WATCHDOG_GRACE_SECONDS
        self._stall_seconds = stall_seconds
        self._abandon = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batch-writer", daemon=True)
        self._watchdog = threading.Thread(
            target=self._watch, name="batch-writer-watchdog", daemon=True
        )
        self._done = threading.Event()  # the writer thread ended, for good or not
        self._finished = False  # ... because the batcher was closed and drained
        self._lock = threading.Lock()
        self._deadline: float | None = None  # when the database call under way is overdue
        self._progress_at = time.monotonic()
        self._stalled = False
        self._current: list[Held] = []
        self.database_up = True
        self.commits = 0  # batches committed so far

    def start(self) -> Writer:
        self._thread.start()
        self._watchdog.start()
        return self

    def join(self, timeout: float) -> bool:
        """Wait for the writer to finish what the (closed) batcher holds; True if it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def abandon(self) -> list[Held]:
        """Stop retrying an unavailable database; returns the batch being written, which the
        caller hands back (it may still commit: a redelivery of a committed row is harmless)."""
        self._abandon.set()
        return list(self._current)

    @property
    def holding(self) -> int:
        """Messages in the batch being written."""
        return len(self._current)

    def alive(self) -> bool:
        """For /healthz: False once the writer thread has died, or while messages wait and it
        has completed no attempt (a commit, or a failure it will retry) for `stall_seconds`:
        stuck in a call no timeout ended."""
        if not self._thread.is_alive():
            return self._finished
        waiting = self.holding or len(self._batcher)
        stalled = bool(waiting) and time.monotonic() - self._progress_at > self._stall_seconds
        if stalled and not self._stalled:
            _log.error(
                "writer_stalled",
                messages=waiting,
                since_s=round(time.monotonic() - self._progress_at, 1),
            )
        self._stalled = stalled
        return not stalled

    def _run(self) -> None:
        try:
            self._write_batches()
            self._finished = True
        except BaseException:
            _log.critical("writer_died", messages=self.holding, exc_info=True)
            raise
        finally:
            self._done.set()

    def _write_batches(self) -> None:
        while True:
            batch = self._batcher.take(timeout=1.0)
            if not batch:
                self._progress_at = time.monotonic()  # idle, nothing to write
                if self._batcher.closed and not len(self._batcher):
                    return
                continue
            self._metrics.held.set(len(self._batcher) + len(batch))
            self._current = batch
            try:
                self.commit(batch)
            except StopRetrying:
                self.hand_back(batch)
            except Exception:  # a bug must not kill the writer: hand back, log, go on
                _log.exception("batch_failed", messages=len(batch))
                self.hand_back(batch)
            self._current = []
            self._metrics.held.set(len(self._batcher))

    def commit(self, batch: list[Held]) -> None:
        """Store a batch, then ack every message whose row is committed."""
        started = time.perf_counter()
        result, refused = self._retrying()(self._attempt, batch)
        elapsed = time.perf_counter() - started
        committed_at = time.time()
        refused_ids = {id(held) for held, _ in refused}
        committed = [held.received for held in batch if id(held) not in refused_ids]
        self._acks.ack(committed)
        for held, error in refused:
            self._dead_letters.send(held.received, Reason.STORAGE_REJECTED, error)
        self.commits += 1
        self._metrics.lag_seconds.observe_many([committed_at - r.publish_time for r in committed])
        self._metrics.acked.inc(len(committed))
        self._metrics.batch_size.observe(len(batch))
        self._metrics.commit_seconds.observe(elapsed)
        for outcome in ("inserted", "updated", "unchanged"):
            self._metrics.rows.labels(outcome=outcome).inc(getattr(result, outcome))
        _log.info(
            "batch_committed",
            messages=len(batch),
            inserted=result.inserted,
            updated=result.updated,
            unchanged=result.unchanged,
            refused=len(refused),
            commit_ms=round(elapsed * 1000, 1),
        )

    def _retrying(self) -> tenacity.Retrying:
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception(lambda exc: not is_refused_value(exc)),
            wait=tenacity.wait_exponential_jitter(
                multiplier=0.05, max=self._max_backoff, jitter=0.1
            ),
            stop=_stop_when(self._abandon.is_set),
            before_sleep=self._on_retry,
            sleep=self._abandon.wait,  # a backoff ends at once on abandon()
            retry_error_callback=_stop_retrying,  # only abandon() stops retries
        )

    def _attempt(self, batch: list[Held]) -> tuple[UpsertResult, list[tuple[Held, str]]]:
        """One try at storing the whole batch, refusals sorted out: any transient error
        restarts it all (re-upserting a committed part is harmless)."""
        try:
            outcome = self._store(batch)
        finally:
            self._progress_at = time.monotonic()
        if not self.database_up:
            _log.info("database_recovered")
        self.database_up = True
        self._metrics.database_up.set(1)
        return outcome

    def _store(self, batch: list[Held]) -> tuple[UpsertResult, list[tuple[Held, str]]]:
        """Upsert the batch; if the database refuses some of it, tell the table's fault (an
        outage: raise TableRefuses) from the rows' (find them, return them with the rest
        stored)."""
        try:
            return self._upsert(batch), []
        except Exception as exc:
            if not is_refused_value(exc):
                raise
            error = _describe(exc)
        if not self._watched(self._repository.accepts_a_known_good_row):
            self._metrics.storage_refusals.labels(cause="table").inc()
            raise TableRefuses("the table refuses a known-good row too", error)
        result, refused = self._find_refused(batch, error)
        rows, refused_rows = _keys(batch), _keys(held for held, _ in refused)
        if len(rows) >= MAJORITY_MIN_ROWS and 2 * len(refused_rows) > len(rows):
            self._metrics.storage_refusals.labels(cause="table").inc()
            why = f"{len(refused_rows)} of {len(rows)} rows of a batch refused"
            raise TableRefuses(why, error)
        self._metrics.storage_refusals.labels(cause="row").inc()
        return result, refused

    def _find_refused(
        self, batch: list[Held], error: str
    ) -> tuple[UpsertResult, list[tuple[Held, str]]]:
        """`batch` was refused (with `error`): store its halves, splitting each refused half
        again, down to the refused rows."""
        if len(batch) == 1:
            return _NOTHING, [(batch[0], error)]
        stored, refused = _NOTHING, []
        middle = len(batch) // 2
        for part in (batch[:middle], batch[middle:]):
            try:
                stored += self._upsert(part)
            except Exception as exc:
                if not is_refused_value(exc):
                    raise
                part_stored, part_refused = self._find_refused(part, _describe(exc))
                stored += part_stored
                refused += part_refused
        return stored, refused

    def _upsert(self, batch: list[Held]) -> UpsertResult:
        return self._watched(self._repository.upsert_many, [held.observation for held in batch])

    def _watched(self, call: Callable[..., T], *args: Any) -> T:
        """A database call the watchdog ends if it is left unanswered past DATABASE_TIMEOUT."""
        with self._lock:
            self._deadline = time.monotonic() + self._answer_within
        try:
            return call(*args)
        finally:
            with self._lock:
                self._deadline = None

    def _on_retry(self, state: tenacity.RetryCallState) -> None:
        self.database_up = False
        self._metrics.database_up.set(0)
        self._metrics.storage_retries.inc()
        error = state.outcome.exception() if state.outcome else None
        retry = {"attempt": state.attempt_number, "retry_in_s": round(state.upcoming_sleep, 2)}
        if isinstance(error, TableRefuses):
            _log.warning(
                "storage_refused", cause="table", why=error.why, error=excerpt(error.error), **retry
            )
            return
        text = first_line(error) if error else ""
        _log.warning("database_unavailable", error=excerpt(text), **retry)

    def _watch(self) -> None:
        """Every WATCH_INTERVAL_SECONDS: is a database call overdue? Then the outage is reported
        at once (not ready, a WARNING) and the call is ended, again every DATABASE_TIMEOUT
        (+1 s) while it lasts (a reconnection within the call gets its own time)."""
        while not self._done.wait(WATCH_INTERVAL_SECONDS):
            with self._lock:  # held while interrupting: the next call is not cut by mistake
                now = time.monotonic()
                if self._deadline is None or now < self._deadline:
                    continue
                self._deadline = now + self._answer_within
                self._repository.interrupt()
            self.database_up = False
            self._metrics.database_up.set(0)
            self._metrics.database_timeouts.inc()
            _log.warning(
                "database_unavailable",
                error=f"no answer within {self._answer_within:g} s: its connections are closed",
            )

    def hand_back(self, batch: list[Held]) -> None:
        """Nack messages so that another processor gets them at once."""
        self._acks.nack([held.received for held in batch])
        self._metrics.nacked.inc(len(batch))
        _log.warning("batch_handed_back", messages=len(batch))


def _stop_when(flag: Callable[[], bool]) -> Callable[[tenacity.RetryCallState], bool]:
    return lambda _state: flag()


def _stop_retrying(state: tenacity.RetryCallState) -> None:
    raise StopRetrying from (state.outcome.exception() if state.outcome else None)


def _keys(batch: Iterable[Held]) -> set[tuple[str, int, str]]:
    return {held.observation.key for held in batch}


def _describe(exc: BaseException) -> str:
    original = getattr(exc, "orig", None) or exc
    return f"{type(original).__name__}: {first_line(original) if str(original).strip() else ''}"
