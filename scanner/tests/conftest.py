"""Scanner fixtures: an in-process emulator per session, a topic and subscription per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from emulator import Emulator
from scanner.tests.helpers import Stream, make_stream


@pytest.fixture(scope="session")
def emulator() -> Iterator[Emulator]:
    with Emulator(port=0) as emu:
        yield emu


@pytest.fixture
def stream(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Stream:
    return make_stream(emulator, monkeypatch)
