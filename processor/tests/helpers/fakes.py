"""In-memory fakes for unit tests, each a subclass of the real interface it stands for."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from google.cloud import pubsub_v1

from processor.pipeline.dispatcher import Dispatcher
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


class RecordingSubscriber(pubsub_v1.SubscriberClient):
    """A subscriber that records acknowledge and modify_ack_deadline calls instead of sending
    them: (kind, ack ids, seconds, timeout, retry timeout) with kind "ack" or "modack".
    `block(kind)` holds calls of one kind until `release(kind)`; `fail_with` makes every
    call raise it (as a dead endpoint or a bug would)."""

    def __init__(self) -> None:  # no channel, no credentials: nothing leaves the process
        self.calls: list[tuple[str, list[str], int | None, float | None, float | None]] = []
        self.entered: dict[str, threading.Event] = {
            "ack": threading.Event(),
            "modack": threading.Event(),
        }
        self._gates = {"ack": threading.Event(), "modack": threading.Event()}
        for gate in self._gates.values():
            gate.set()
        self.fail_with: BaseException | None = None

    def block(self, kind: str) -> None:
        self._gates[kind].clear()

    def release(self, kind: str) -> None:
        self._gates[kind].set()

    def acknowledge(self, request: Any = None, **kwargs: Any) -> None:  # type: ignore[override]
        self._record("ack", list(request.ack_ids), None, kwargs)

    def modify_ack_deadline(self, request: Any = None, **kwargs: Any) -> None:  # type: ignore[override]
        self._record("modack", list(request.ack_ids), request.ack_deadline_seconds, kwargs)

    def sent(self, kind: str) -> list[list[str]]:
        return [ids for k, ids, *_ in list(self.calls) if k == kind]

    def _record(self, kind: str, ids: list[str], seconds: int | None, kwargs: Any) -> None:
        self.entered[kind].set()
        self._gates[kind].wait(30)
        retry = kwargs.get("retry")
        self.calls.append(
            (kind, ids, seconds, kwargs.get("timeout"), getattr(retry, "timeout", None))
        )
        if self.fail_with is not None:
            raise self.fail_with


class RecordingDispatcher(Dispatcher):
    """A dispatcher that records what it is asked to send, and sends nothing."""

    def __init__(self) -> None:
        self.acked: list[str] = []
        self.nacked: list[str] = []
        self.extensions: list[list[str]] = []

    def ack(self, ack_ids: list[str]) -> None:
        self.acked += ack_ids

    def nack(self, ack_ids: list[str]) -> None:
        self.nacked += ack_ids

    def extend(self, ack_ids: list[str]) -> None:
        self.extensions.append(list(ack_ids))
