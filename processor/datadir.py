"""`python -m processor.datadir`, as compose files before `datadir --owner` run it: the same
as `mini-scan datadir` (processor/commands/datadir.py)."""

import sys

from processor.commands.datadir import main

if __name__ == "__main__":
    sys.exit(main())
