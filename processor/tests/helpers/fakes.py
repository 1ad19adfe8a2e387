"""In-memory fakes for unit tests, each a subclass of the real interface it stands for."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from processor.pipeline.messages import Held, Received
from processor.pipeline.refusals import Refused
from processor.pipeline.writer import Outcomes
from processor.schema import Observation
from processor.storage import Repository, UpsertResult


class RecordedOutcomes(Outcomes):
    """What the writer reported: messages committed (to be acked), refused (to be
    dead-lettered, with the database's words) and handed back; `broken` makes each report raise,
    as a bug in the ack path would."""

    def __init__(self, broken: bool = False) -> None:
        self.acked: list[Received] = []
        self.refused: list[tuple[Received, str]] = []
        self.nacked: list[Received] = []
        self._broken = broken

    def committed(self, batch: Sequence[Held], refused: Refused) -> None:
        if self._broken:
            raise RuntimeError("a bug in the ack path")
        refused_ids = {id(held) for held, _ in refused}
        self.acked += [h.received for h in batch if id(h) not in refused_ids]
        self.refused += [(held.received, error) for held, error in refused]

    def hand_back(self, batch: Sequence[Held]) -> None:
        if self._broken:
            raise RuntimeError("a bug in the nack path")
        self.nacked += [held.received for held in batch]


class MemoryRepository(Repository):
    """The table as a dict (newest observation per key): no database at all."""

    def __init__(self) -> None:
        self.table: dict[tuple[str, int, str], Observation] = {}

    def upsert_many(self, observations: Iterable[Observation]) -> UpsertResult:
        for o in observations:
            self.table[o.key] = max(self.table.get(o.key, o), o, key=lambda x: x[3:])
        return UpsertResult(len(self.table), 0, 0)


def held(observations: Sequence[Observation]) -> list[Held]:
    return [
        Held(Received(f"ack-{i}", str(i), b"{}", {}, time.time()), o)
        for i, o in enumerate(observations)
    ]


def fresh_keys(count: int, start: int = 0) -> list[Observation]:
    """Observations of distinct, new keys."""
    now = int(time.time())
    return [
        Observation(f"10.9.{i // 250}.{i % 250}", 443, "HTTP", now - i, f"ok {i}")
        for i in range(start, start + count)
    ]
