"""`python -m scanner`."""

from __future__ import annotations

import sys

from processor.stopping import exit_on_signals

with exit_on_signals(0):  # a stop while the scanner is being imported: nothing to clean up
    from scanner.cli import main

    sys.exit(main())
