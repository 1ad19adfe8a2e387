"""`python -m processor`: the same as `mini-scan process`."""

import sys

from processor.cli import main

sys.exit(main(["process", *sys.argv[1:]]))  # a stop while it imports, or no credentials: one line
