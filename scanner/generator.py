"""Scan results with the reference Go scanner's distribution, seeded and pure.

`ScanGenerator(...).next()` draws one message. Every random choice comes from one
`random.Random(seed)`, in a fixed order that does not depend on the clock, so the same seed gives
the same sequence of messages whatever the wall-clock time (`now`) they are stamped with.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

from processor.schema import Observation, Reason, encode
from scanner.malformed import MALFORMED, MALFORMED_REASONS

SERVICES = ("HTTP", "SSH", "DNS")
MAX_KEYS = 255 * 65535 * len(SERVICES)  # the reference distribution's whole key space
# Out-of-order lags: most a few minutes late, some up to a day (a scanner's backlog replayed).
_SHORT_LAG = (1, 300)
_LONG_LAG = (301, 86_400)
_LONG_LAG_SHARE = 0.2
# Duplicates re-publish one of the most recent messages, as a retrying publisher would.
_DUPLICATE_WINDOW = 1000

Key = tuple[str, int, str]


class Kind(StrEnum):
    VALID = "valid"
    DUPLICATE = "duplicate"
    OUT_OF_ORDER = "out_of_order"
    MALFORMED = "malformed"


class ScanMessage(NamedTuple):
    """One body to publish and what a consumer should make of it."""

    seq: int
    kind: Kind
    data: bytes
    observation: Observation | None  # None for malformed bodies
    data_version: int | None
    reason: Reason | None  # the rejection a malformed body must earn
    duplicate_of: int | None = None

    def record(self, message_id: str) -> dict[str, Any]:
        """The `--log` line for this message once Pub/Sub confirmed it as `message_id`."""
        line: dict[str, Any] = {"message_id": message_id, "seq": self.seq, "kind": str(self.kind)}
        if self.observation is not None:
            line.update(self.observation._asdict(), data_version=self.data_version)
        if self.reason is not None:
            line["reason"] = str(self.reason)
        if self.duplicate_of is not None:
            line["duplicate_of"] = self.duplicate_of
        return line


@dataclass(frozen=True, slots=True)
class Mix:
    """Fractions of each irregular kind; the rest are valid, fresh messages."""

    duplicates: float = 0.0
    out_of_order: float = 0.0
    malformed: float = 0.0

    def __post_init__(self) -> None:
        for name in ("duplicates", "out_of_order", "malformed"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be between 0 and 1")
        if self.duplicates + self.out_of_order + self.malformed > 1.0:
            raise ValueError("--duplicates, --out-of-order and --malformed add up to more than 1")


class ScanGenerator:
    """Draws scan messages; `keys` fixes the key set so that later scans update earlier rows."""

    def __init__(
        self,
        now: Callable[[], int],
        *,
        seed: int | None = None,
        keys: int | None = None,
        mix: Mix | None = None,
    ) -> None:
        self._now = now
        self._rng = random.Random(seed)
        self._mix = mix or Mix()
        self._keys = self._draw_key_set(keys) if keys else None
        self._recent: deque[ScanMessage] = deque(maxlen=_DUPLICATE_WINDOW)
        self._seq = 0
        self._malformed = 0

    def next(self) -> ScanMessage:
        """The next message; its kind is drawn first, so the mix holds over any prefix."""
        seq, self._seq = self._seq, self._seq + 1
        draw, mix = self._rng.random(), self._mix
        if draw < mix.malformed:
            return self._malformed_message(seq)
        if draw < mix.malformed + mix.duplicates and self._recent:
            original = self._rng.choice(self._recent)
            return original._replace(seq=seq, kind=Kind.DUPLICATE, duplicate_of=original.seq)
        late = draw < mix.malformed + mix.duplicates + mix.out_of_order
        message = self._scan(seq, Kind.OUT_OF_ORDER if late else Kind.VALID)
        self._recent.append(message)
        return message

    def _scan(self, seq: int, kind: Kind) -> ScanMessage:
        ip, port, service = self._key()
        draw = self._rng.random
        # int(random() * n) rather than randrange(n): the same uniform draw at a third of the
        # cost, and generation is the scanner's hot path at 20,000+ messages/s.
        response = f"service response: {int(draw() * 100)}"
        version = 1 if draw() < 0.5 else 2
        timestamp = self._now()
        if kind is Kind.OUT_OF_ORDER:
            low, high = _LONG_LAG if draw() < _LONG_LAG_SHARE else _SHORT_LAG
            timestamp = max(0, timestamp - low - int(draw() * (high - low + 1)))
        observation = Observation(ip, port, service, timestamp, response)
        return ScanMessage(seq, kind, encode(observation, version), observation, version, None)

    def _key(self) -> Key:
        if self._keys is not None:
            return self._keys[int(self._rng.random() * len(self._keys))]
        return self._fresh_key()

    def _fresh_key(self) -> Key:
        # The reference scanner: 1.1.1.{rand.Intn(255)}, rand.Intn(65535), one of three services.
        draw = self._rng.random
        return f"1.1.1.{int(draw() * 255)}", int(draw() * 65535), SERVICES[int(draw() * 3)]

    def _draw_key_set(self, count: int) -> list[Key]:
        chosen: dict[Key, None] = {}  # a dict keeps draw order, so the set is reproducible
        while len(chosen) < count:
            chosen[self._fresh_key()] = None
        return list(chosen)

    def _malformed_message(self, seq: int) -> ScanMessage:
        # Each reason in turn, so even a short run covers every rejection class.
        reason = MALFORMED_REASONS[self._malformed % len(MALFORMED_REASONS)]
        self._malformed += 1
        body = MALFORMED[reason](self._rng, self._now())
        return ScanMessage(seq, Kind.MALFORMED, body, None, None, reason)
