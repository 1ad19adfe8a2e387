"""The commands an operator types: one module per `mini-scan` subcommand, each a thin
`main(argv) -> int` on `run_command`.

Imports only the standard library and `processor.errors`: `healthcheck` runs every few seconds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from processor.errors import MiniScanError


def run_command(
    parser: argparse.ArgumentParser,
    job: Callable[[argparse.Namespace], int],
    argv: Sequence[str] | None,
) -> int:
    """Parse `argv`, run `job`; an error of the project's own (`MiniScanError`: invalid
    settings, a dependency not there, a database that cannot answer) is one line on stderr and
    the error's exit code, never a traceback."""
    args = parser.parse_args(argv)
    try:
        return job(args)
    except MiniScanError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
