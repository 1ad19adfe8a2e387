"""Decode speed against another revision's decoder, in one run: what a change to
`processor/schema.py` costs per message.

Both decoders take the same messages (bench.pipeline's, mixed v1/v2) in interleaved rounds of
2,000, in alternating order; CPU time of this process, so other work on the machine weighs on
both alike. Prints each decoder's rate and the ratio (total, and median of paired rounds).

    uv run python -m bench.decode [--against main] [--rounds 300]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from bench.pipeline import observations
from processor import schema

ROUND = 2_000


def load_revision(revision: str) -> ModuleType:
    """`processor/schema.py` as it is at `revision`, as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{revision}:processor/schema.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    with tempfile.TemporaryDirectory(prefix="mini-scan-decode-") as directory:
        path = Path(directory) / "schema_then.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("schema_then", path)
        if spec is None or spec.loader is None:
            raise RuntimeError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules["schema_then"] = module  # pydantic resolves the TypedDicts' annotations here
        spec.loader.exec_module(module)
    return module


def cpu_seconds(decode: Callable[[bytes], object], messages: list[bytes]) -> float:
    started = time.process_time()
    for message in messages:
        decode(message)
    return time.process_time() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="main", help="git revision to compare with")
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args(argv)

    then = load_revision(args.against)
    messages = [schema.encode(o, 1 + i % 2) for i, o in enumerate(observations(10 * ROUND))]
    ratios, total_then, total_now = [], 0.0, 0.0
    for number in range(args.rounds):
        part = messages[number % 10 * ROUND : (number % 10 + 1) * ROUND]
        if number % 2:
            now, old = cpu_seconds(schema.decode, part), cpu_seconds(then.decode, part)
        else:
            old, now = cpu_seconds(then.decode, part), cpu_seconds(schema.decode, part)
        ratios.append(old / now)
        total_then, total_now = total_then + old, total_now + now
    count = args.rounds * ROUND
    print(f"decode at {args.against}: {count / total_then:,.0f} msg/s (CPU time)")
    print(f"decode now: {count / total_now:,.0f} msg/s (CPU time)")
    print(
        f"now / {args.against}: {total_then / total_now:.1%} "
        f"(median of paired rounds {statistics.median(ratios):.1%})"
    )
    print("load average:", " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
