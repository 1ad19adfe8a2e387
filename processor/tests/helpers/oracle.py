"""The merge rule stated the simplest way, for tests to compare the table against."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from processor.schema import Observation

Row = tuple[str, int, str, dt.datetime, str, dt.datetime]


def expected_rows(observations: Iterable[Observation]) -> list[Row]:
    """Newest `(timestamp, response)` per key and the oldest timestamp as `first_seen`."""
    best: dict[tuple[str, int, str], tuple[int, str]] = {}
    first: dict[tuple[str, int, str], int] = {}
    for obs in observations:
        best[obs.key] = max(
            best.get(obs.key, (obs.timestamp, obs.response)), (obs.timestamp, obs.response)
        )
        first[obs.key] = min(first.get(obs.key, obs.timestamp), obs.timestamp)
    return sorted(
        (*key, _utc(ts), response, _utc(first[key])) for key, (ts, response) in best.items()
    )


def stored_rows(rows: Iterable[Any]) -> list[Row]:
    """The table's rows without `updated_at`, in the oracle's shape."""
    return sorted((r.ip, r.port, r.service, r.last_scanned, r.response, r.first_seen) for r in rows)


def _utc(timestamp: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC)
