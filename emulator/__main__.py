"""`python -m emulator`: serve until SIGTERM or SIGINT, then exit 0."""

from __future__ import annotations

import signal
import sys


def _stopped(_signum: int, _frame: object) -> None:
    raise SystemExit(0)  # stopped while Python imports the emulator: nothing started yet


for _stop in (signal.SIGTERM, signal.SIGINT):
    signal.signal(_stop, _stopped)  # main() installs its own once it starts serving

from emulator.cli import main  # noqa: E402

sys.exit(main())
