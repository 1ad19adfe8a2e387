"""The single writer: takes batches from the batcher, stores each in one transaction, and reports
what became of every message (committed, refused, or handed back) to the processor, which acks,
dead-letters or nacks (`processor.py` holds that policy).

- Transient database errors (anything but a refused value) are retried with exponential backoff
  and jitter, for as long as it takes, while the source keeps the messages' leases; the
  watchdog (`watchdog.py`) turns a call left unanswered into such an error.
- Refused rows are sorted out by `refusals.py`: the bad rows come back as refused, a table at
  fault is an outage like any other.
- Nothing is reported committed before the transaction holding its row has committed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import structlog
import tenacity

from processor.errors import StopRetrying, TableRefuses, first_line
from processor.pipeline.batcher import Batcher
from processor.pipeline.messages import Held
from processor.pipeline.refusals import Refused, is_refused_value, store_isolating_refusals
from processor.pipeline.watchdog import Watchdog
from processor.runtime.logs import excerpt
from processor.runtime.metrics import Metrics
from processor.storage import Repository, UpsertResult

_log = structlog.get_logger("processor.pipeline.writer")


class Outcomes(Protocol):
    """Where the writer reports what became of each message; the processor decides the rest."""

    def committed(self, batch: Sequence[Held], refused: Refused) -> None:
        """`batch` (less the refused ones) is durably stored; `refused` can never be."""

    def hand_back(self, batch: Sequence[Held]) -> None:
        """Not stored, and not to be retried here (a stop during an outage, a bug)."""


class Writer:
    """The writer thread and the watchdog that guards its database calls."""

    def __init__(
        self,
        batcher: Batcher,
        repository: Repository,
        outcomes: Outcomes,
        metrics: Metrics,
        max_backoff: float = 10.0,
        database_timeout: float = 30.0,
        stall_seconds: float = 120.0,
    ) -> None:
        self._batcher = batcher
        self._repository = repository
        self._outcomes = outcomes
        self._metrics = metrics
        self._max_backoff = max_backoff
        self._stall_seconds = stall_seconds
        self._watchdog = Watchdog(repository.interrupt, self._on_overdue, database_timeout)
        self._abandon = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batch-writer", daemon=True)
        self._finished = False  # the thread ended because the batcher was closed and drained
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
        """For /healthz: False once the writer or its watchdog has died, or while messages wait
        and the writer has completed no attempt (a commit, or a failure it will retry) for
        `stall_seconds`: stuck in a call no timeout ended."""
        if not self._thread.is_alive():
            return self._finished
        if not self._watchdog.alive():
            return False
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
            self._watchdog.stop()

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
                self._outcomes.hand_back(batch)
            except Exception:  # a bug must not kill the writer: hand back, log, go on
                _log.exception("batch_failed", messages=len(batch))
                self._outcomes.hand_back(batch)
            self._current = []
            self._metrics.held.set(len(self._batcher))

    def commit(self, batch: list[Held]) -> None:
        """Store a batch, then report it committed (with the rows the database refused)."""
        started = time.perf_counter()
        result, refused = self._retrying()(self._attempt, batch)
        elapsed = time.perf_counter() - started
        committed_at = time.time()
        self._outcomes.committed(batch, refused)
        self.commits += 1
        refused_ids = {id(held) for held, _ in refused}
        self._metrics.lag_seconds.observe_many(
            [committed_at - h.received.publish_time for h in batch if id(h) not in refused_ids]
        )
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

    def _attempt(self, batch: list[Held]) -> tuple[UpsertResult, Refused]:
        """One try at storing the whole batch, refusals sorted out: any transient error
        restarts it all (re-upserting a committed part is harmless)."""
        try:
            outcome = store_isolating_refusals(
                batch,
                self._upsert,
                lambda: self._watchdog.watched(self._repository.accepts_a_known_good_row),
                self._metrics,
            )
        finally:
            self._progress_at = time.monotonic()
        if not self.database_up:
            _log.info("database_recovered")
        self.database_up = True
        self._metrics.database_up.set(1)
        return outcome

    def _upsert(self, batch: list[Held]) -> UpsertResult:
        observations = [held.observation for held in batch]
        return self._watchdog.watched(self._repository.upsert_many, observations)

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
        _log.warning(
            "database_unavailable", error=excerpt(first_line(error) if error else ""), **retry
        )

    def _on_overdue(self, answer_within: float) -> None:
        self.database_up = False
        self._metrics.database_up.set(0)
        self._metrics.database_timeouts.inc()
        _log.warning(
            "database_unavailable",
            error=f"no answer within {answer_within:g} s: its connections are closed",
        )


def _stop_when(flag: Callable[[], bool]) -> Callable[[tenacity.RetryCallState], bool]:
    return lambda _state: flag()


def _stop_retrying(state: tenacity.RetryCallState) -> None:
    raise StopRetrying from (state.outcome.exception() if state.outcome else None)
