"""`python -m scanner`: the same as `mini-scan scan`."""

from __future__ import annotations

import sys

from processor.cli import main

sys.exit(main(["scan", *sys.argv[1:]]))  # a stop while it imports, or no credentials: one line
