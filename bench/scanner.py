"""Publish rate of the scanner against our emulator, next to a bare PublisherClient loop.

Starts `python -m emulator` in its own process (so it does not share the publisher's GIL), creates
a topic and a subscription (so messages are retained, as in production), then times
  1. the scanner (`scanner.cli.main`, `--rate 0`): generate, encode, batch, publish, confirm;
  2. a bare `PublisherClient.publish()` loop of pre-encoded bytes, confirmed by callbacks.

    uv run python -m bench.scanner [--messages 200000] [--bare-messages 100000]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's directory would come first on sys.path and shadow `emulator`.
if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import os
import resource
import threading
import time
import uuid
from collections.abc import Callable

from google.cloud import pubsub_v1
from google.cloud.pubsub_v1 import types

from emulator.testing import emulator_process
from processor.schema import Observation, encode
from scanner.cli import main as scanner_main

PROJECT = "bench"


def topic_with_subscription() -> tuple[str, str]:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    topic = f"projects/{PROJECT}/topics/{name}"
    pubsub_v1.PublisherClient().create_topic(name=topic)
    subscriber = pubsub_v1.SubscriberClient()
    subscriber.create_subscription(name=f"projects/{PROJECT}/subscriptions/{name}", topic=topic)
    subscriber.close()
    return name, topic


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


def timed(run: Callable[[int], None], count: int) -> tuple[float, float]:
    """Messages per wall-clock second and CPU microseconds per message (a shared machine's
    other load slows the first, hardly the second)."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    run(count)
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    return count / wall, cpu / count * 1e6


def run_scanner(count: int) -> None:
    name, _ = topic_with_subscription()
    argv = ["--rate", "0", "--count", str(count), "--seed", "1"]
    argv += ["--pubsub-project-id", PROJECT, "--pubsub-topic", name, "--log-level", "WARNING"]
    if scanner_main(argv) != 0:
        raise RuntimeError("the scanner failed")


def run_bare_client(count: int) -> None:
    _, topic = topic_with_subscription()
    body = encode(Observation("1.1.1.1", 80, "HTTP", int(time.time()), "service response: 1"))
    flow = types.PublishFlowControl(
        message_limit=20_000, limit_exceeded_behavior=types.LimitExceededBehavior.BLOCK
    )
    client = pubsub_v1.PublisherClient(
        batch_settings=types.BatchSettings(max_messages=1000, max_latency=0.02),
        publisher_options=types.PublisherOptions(flow_control=flow),
    )
    lock, done, confirmed = threading.Lock(), threading.Event(), [0]

    def settle(future: pubsub_v1.publisher.futures.Future) -> None:
        future.result()
        with lock:
            confirmed[0] += 1
            if confirmed[0] == count:
                done.set()

    for _ in range(count):
        client.publish(topic, body).add_done_callback(settle)
    done.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--bare-messages", type=int, default=100_000)
    args = parser.parse_args()
    with emulator_process() as address:
        os.environ["PUBSUB_EMULATOR_HOST"] = address
        rows = [
            (
                "scanner --rate 0 (generate, encode, batch)",
                args.messages,
                timed(run_scanner, args.messages),
            ),
            (
                "bare PublisherClient.publish() loop",
                args.bare_messages,
                timed(run_bare_client, args.bare_messages),
            ),
        ]
    print(f"{'publisher':<44} {'messages':>9} {'msg/s':>9} {'CPU us/msg':>11}")
    for name, count, (rate, cpu) in rows:
        print(f"{name:<44} {count:>9} {rate:>9,.0f} {cpu:>11.1f}")


if __name__ == "__main__":
    main()
