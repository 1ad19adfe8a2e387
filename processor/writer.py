"""Commits batches and acks their messages: the one place that decides ack, nack or dead-letter
for a decoded message.

- Transient database errors (anything but a refused value) are retried with exponential backoff
  and jitter, for as long as it takes, while the client keeps the messages' leases.
- A batch the database refuses is split until the refused rows are found; they are
  dead-lettered as `storage_rejected` and the rest is committed.
- A message is acked only after the transaction holding its row has committed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import sqlalchemy as sa
import structlog
import tenacity

from processor.batcher import Batcher
from processor.deadletter import DeadLetters
from processor.delivery import Acknowledger, Held
from processor.observability import Metrics, excerpt
from processor.schema import Reason
from processor.store import Repository, UpsertResult

_log = structlog.get_logger("processor.writer")


class StopRetrying(Exception):
    """The process is shutting down while the database is still unavailable."""


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
    """The single writer thread: takes batches from the batcher, commits them, acks them."""

    def __init__(
        self,
        batcher: Batcher,
        repository: Repository,
        dead_letters: DeadLetters,
        acks: Acknowledger,
        metrics: Metrics,
        max_backoff: float = 10.0,
    ) -> None:
        self._batcher = batcher
        self._repository = repository
        self._dead_letters = dead_letters
        self._acks = acks
        self._metrics = metrics
        self._max_backoff = max_backoff
        self._abandon = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batch-writer", daemon=True)
        self._current: list[Held] = []
        self.database_up = True
        self.commits = 0  # batches committed so far

    def start(self) -> Writer:
        self._thread.start()
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

    def _run(self) -> None:
        while True:
            batch = self._batcher.take(timeout=1.0)
            if not batch:
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
        result, refused = self._store(batch)
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

    def _store(self, batch: list[Held]) -> tuple[UpsertResult, list[tuple[Held, str]]]:
        """Upsert, splitting the batch in halves while the database refuses part of it."""
        try:
            return self._upsert([held.observation for held in batch]), []
        except Exception as exc:
            if not is_refused_value(exc):
                raise
            if len(batch) == 1:
                return UpsertResult(0, 0, 0), [(batch[0], _describe(exc))]
        middle = len(batch) // 2
        first, refused_first = self._store(batch[:middle])
        second, refused_second = self._store(batch[middle:])
        total = UpsertResult(
            first.inserted + second.inserted,
            first.updated + second.updated,
            first.unchanged + second.unchanged,
        )
        return total, refused_first + refused_second

    def _upsert(self, observations: list) -> UpsertResult:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(lambda exc: not is_refused_value(exc)),
            wait=tenacity.wait_exponential_jitter(
                multiplier=0.05, max=self._max_backoff, jitter=0.1
            ),
            stop=_stop_when(self._abandon.is_set),
            before_sleep=self._on_retry,
            sleep=self._abandon.wait,  # a backoff ends at once on abandon()
        )
        try:
            result = retrying(self._repository.upsert_many, observations)
        except tenacity.RetryError as exc:  # only abandon() stops retries; refusals raise as is
            raise StopRetrying from exc
        if not self.database_up:
            _log.info("database_recovered")
        self.database_up = True
        self._metrics.database_up.set(1)
        return result

    def _on_retry(self, state: tenacity.RetryCallState) -> None:
        self.database_up = False
        self._metrics.database_up.set(0)
        self._metrics.storage_retries.inc()
        error = state.outcome.exception() if state.outcome else None
        _log.warning(
            "database_unavailable",
            attempt=state.attempt_number,
            retry_in_s=round(state.upcoming_sleep, 2),
            error=excerpt(str(error).splitlines()[0] if error else ""),
        )

    def hand_back(self, batch: list[Held]) -> None:
        """Nack messages so that another processor gets them at once."""
        self._acks.nack([held.received for held in batch])
        self._metrics.nacked.inc(len(batch))
        _log.warning("batch_handed_back", messages=len(batch))


def _stop_when(flag: Callable[[], bool]) -> Callable[[tenacity.RetryCallState], bool]:
    return lambda _state: flag()


def _describe(exc: BaseException) -> str:
    original = getattr(exc, "orig", None) or exc
    return f"{type(original).__name__}: {str(original).splitlines()[0] if str(original) else ''}"
