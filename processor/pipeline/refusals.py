"""Rows the database refuses: the bad rows of a batch are found and given back to be
dead-lettered, the rest is stored; unless the table itself is at fault, which is an outage.

The rule: when the database refuses a batch, a known-good row (the canary) is tried; if the
table refuses it too, or most rows of a batch of at least MAJORITY_MIN_ROWS, the table is at
fault (a constraint or a type changed under us): `TableRefuses`, retried like any outage, and
nothing is dead-lettered. Otherwise the batch is split in halves down to the refused rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import sqlalchemy as sa

from processor.errors import TableRefuses, first_line
from processor.pipeline.messages import Held
from processor.runtime.metrics import Metrics
from processor.storage import UpsertResult

# Refusals of most of a batch's rows are the table's fault, not the rows', from this many
# distinct rows up; in a smaller batch a few bad rows could be most of it.
MAJORITY_MIN_ROWS = 10
_NOTHING = UpsertResult(0, 0, 0)

Upsert = Callable[[list[Held]], UpsertResult]
Refused = list[tuple[Held, str]]  # each refused message, with the database's words


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


def store_isolating_refusals(
    batch: list[Held],
    upsert: Upsert,
    table_accepts_a_good_row: Callable[[], bool],
    metrics: Metrics,
) -> tuple[UpsertResult, Refused]:
    """Upsert the batch; if the database refuses some of it, tell the table's fault (raise
    `TableRefuses`) from the rows' (return them, with the rest stored). Any other error is raised
    unchanged: the caller retries it as an outage."""
    try:
        return upsert(batch), []
    except Exception as exc:
        if not is_refused_value(exc):
            raise
        error = describe(exc)
    if not table_accepts_a_good_row():
        metrics.storage_refusals.labels(cause="table").inc()
        raise TableRefuses("the table refuses a known-good row too", error)
    result, refused = _find_refused(batch, error, upsert)
    rows, refused_rows = _keys(batch), _keys(held for held, _ in refused)
    if len(rows) >= MAJORITY_MIN_ROWS and 2 * len(refused_rows) > len(rows):
        metrics.storage_refusals.labels(cause="table").inc()
        raise TableRefuses(f"{len(refused_rows)} of {len(rows)} rows of a batch refused", error)
    metrics.storage_refusals.labels(cause="row").inc()
    return result, refused


def _find_refused(batch: list[Held], error: str, upsert: Upsert) -> tuple[UpsertResult, Refused]:
    """`batch` was refused (with `error`): store its halves, splitting each refused half again,
    down to the refused rows."""
    if len(batch) == 1:
        return _NOTHING, [(batch[0], error)]
    stored, refused = _NOTHING, []
    middle = len(batch) // 2
    for part in (batch[:middle], batch[middle:]):
        try:
            stored += upsert(part)
        except Exception as exc:
            if not is_refused_value(exc):
                raise
            part_stored, part_refused = _find_refused(part, describe(exc), upsert)
            stored += part_stored
            refused += part_refused
    return stored, refused


def _keys(batch: Iterable[Held]) -> set[tuple[str, int, str]]:
    return {held.observation.key for held in batch}


def describe(exc: BaseException) -> str:
    """The driver's error for a dead letter's `error` attribute: its type and first line."""
    original = getattr(exc, "orig", None) or exc
    return f"{type(original).__name__}: {first_line(original) if str(original).strip() else ''}"
