"""`python -m processor`: the same as `mini-scan process`."""

import sys

from processor.app import main

sys.exit(main())
