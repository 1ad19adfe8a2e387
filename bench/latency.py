"""Publish-to-commit latency at low rates: the first message after an idle spell must wait
BATCH_MAX_WAIT_MS (50 ms), not the writer's idle period.

For each rate and consumer, a processor child drains a fresh subscription while this process
publishes the reference distribution at that rate, one message per publish (no client
batching); the child records every message's lag (commit time minus publish time).

    uv run python -m bench.latency [--seconds 30] [--rates 1 100]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from google.cloud import pubsub_v1
from rich.console import Console
from rich.table import Table

from bench.e2e import _child_command, _result, fresh_subscription, reference_messages
from emulator.testing import emulator_process, wait_until


def publish_at(topic: str, rate: float, count: int) -> None:
    publisher = pubsub_v1.PublisherClient(
        batch_settings=pubsub_v1.types.BatchSettings(max_messages=1, max_latency=0.001)
    )
    started = time.monotonic()
    for i, message in enumerate(reference_messages(count)):
        time.sleep(max(0.0, started + i / rate - time.monotonic()))
        publisher.publish(topic, message.data).result(timeout=30)


def measure(rate: float, seconds: float, consumer: str, args: argparse.Namespace) -> dict:
    count = max(10, int(rate * seconds))
    topic, subscription = fresh_subscription(f"latency-{int(rate)}")
    url = f"sqlite:///{args.workdir}/latency-{int(rate)}-{consumer}.db"
    progress = Path(args.workdir) / f"latency-{int(rate)}-{consumer}.progress"
    progress.unlink(missing_ok=True)
    command = _child_command("fleet", subscription, count, url, args)
    child = subprocess.Popen(
        [*command, "--progress", str(progress), "--consumer", consumer],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    # The child writes its progress file once its streams are open.
    if not wait_until(progress.exists, timeout=120, interval=0.05):
        raise RuntimeError(f"the {consumer} processor did not start")
    publish_at(topic, rate, count)
    wait_until(lambda: int(progress.read_text() or 0) >= count, timeout=120, interval=0.05)
    child.terminate()
    stdout, _ = child.communicate(timeout=60)
    result = _result(stdout)
    if result is None:
        raise RuntimeError(f"the {consumer} processor child failed")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--rates", type=float, nargs="+", default=[1, 100])
    args = parser.parse_args(argv)
    args.streams, args.max_messages = 2, 1000
    args.workdir = tempfile.mkdtemp(prefix="mini-scan-latency-")
    console = Console(width=150)
    table = Table(title="Publish-to-commit lag, SQLite, BATCH_MAX_WAIT_MS=50")
    for column in ("rate msg/s", "consumer", "messages", "lag p50 ms", "lag p99 ms"):
        table.add_column(column, justify="right")
    with emulator_process() as address:
        os.environ["PUBSUB_EMULATOR_HOST"] = address
        for rate in args.rates:
            for consumer in ("batch", "client"):
                r = measure(rate, args.seconds, consumer, args)
                row = (f"{rate:g}", consumer, str(r["messages"]))
                table.add_row(*row, f"{r['p50'] * 1000:.0f}", f"{r['p99'] * 1000:.0f}")
                console.print(f"  {rate:g} msg/s, {consumer}: p50 {r['p50'] * 1000:.0f} ms")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
