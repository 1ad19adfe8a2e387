"""`python -m processor`: the same as `mini-scan process`."""

import sys

from processor.stopping import exit_on_signals

with exit_on_signals(0):  # a stop while the processor is being imported: nothing to clean up
    from processor.app import main

    sys.exit(main())
