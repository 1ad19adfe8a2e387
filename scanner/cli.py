"""`python -m scanner` / `mini-scan scan`: publish mock scan results until --count or a signal."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import IO

import structlog
from google.cloud import pubsub_v1

from emulator.logs import configure_logging
from processor.commands import run_command
from processor.config import ArgumentParser, PubSubSettings, add_arguments, load
from processor.errors import ConfigError
from processor.stopping import Stopped, stop_on_signals
from scanner.generator import MAX_KEYS, Mix, ScanGenerator, ScanMessage
from scanner.publisher import BatchPublisher, check_topic

_log = structlog.get_logger("scanner")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _at_least(low: float, kind: type = int) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} is below {low}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="mini-scan scan",
        description="Publish mock scan results (the reference scanner's distribution) to Pub/Sub.",
    )
    add = parser.add_argument
    add("--rate", type=_at_least(0, float), default=1.0, help="messages/s; 0: as fast as possible")
    add("--count", type=_at_least(1), default=None, help="stop after N (default: until a signal)")
    add(
        "--progress-every",
        type=_at_least(0.1, float),
        default=5.0,
        metavar="SECONDS",
        help="a progress log line this often (5)",
    )
    add("--seed", type=int, default=None, help="same seed, same messages (but for timestamps)")
    add(
        "--base-timestamp",
        type=_at_least(0),
        default=None,
        metavar="UNIX_SECONDS",
        help="stamp messages with this time instead of the clock: fully reproducible runs",
    )
    add(
        "--keys",
        type=_at_least(1),
        default=None,
        metavar="N",
        help="draw keys from a fixed set of N, so later scans update earlier rows",
    )
    add(
        "--duplicates",
        type=_fraction,
        default=0.0,
        metavar="FRACTION",
        help="re-publish an earlier message byte for byte",
    )
    add(
        "--out-of-order",
        type=_fraction,
        default=0.0,
        metavar="FRACTION",
        help="stamp with a time in the past (up to a day)",
    )
    add(
        "--malformed",
        type=_fraction,
        default=0.0,
        metavar="FRACTION",
        help="publish bodies the decoder rejects, each rejection reason in turn",
    )
    add(
        "--log",
        type=argparse.FileType("w"),
        default=None,
        metavar="FILE",
        help="write a JSON line per message once its publish is confirmed",
    )
    add_arguments(parser, PubSubSettings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scanner; 0 after --count messages or a SIGINT/SIGTERM, all confirmed."""
    return run_command(build_parser(), _scan, argv)


def _scan(args: argparse.Namespace) -> int:
    settings = load(PubSubSettings, args)
    try:
        mix = Mix(args.duplicates, args.out_of_order, args.malformed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.keys is not None and args.keys > MAX_KEYS:
        raise ConfigError(f"--keys is above {MAX_KEYS} keys")
    settings.apply_emulator_host()
    # The project, and so the credentials, before logging starts: without them the one line on
    # stderr is the error, not google.auth's warning first.
    _ = settings.project
    # On stderr: `--log -` writes the published messages to stdout.
    configure_logging(settings.log_level, settings.log_format, stream="stderr")
    now = (lambda: args.base_timestamp) if args.base_timestamp is not None else _wall_clock
    generator = ScanGenerator(now, seed=args.seed, keys=args.keys, mix=mix)
    return _run(settings, generator, args)


def _run(settings: PubSubSettings, generator: ScanGenerator, args: argparse.Namespace) -> int:
    client = pubsub_v1.PublisherClient()
    with stop_on_signals() as stop:  # a stop while the topic is checked ends the scanner too
        try:
            check_topic(client, settings.topic_path, stop=stop)
        except Stopped as exc:  # a stop is this command's normal end, before the first message too
            _log.info("scanner_stopped", reason=str(exc))
            return 0
        tally = _Tally(args.log)
        publisher = BatchPublisher(client, settings.topic_path, on_confirmed=tally.confirmed)
        _log.info("scanner_started", topic=settings.topic_path, rate=args.rate, count=args.count)
        started = time.monotonic()
        try:
            _produce(generator, publisher, tally, args, stop)
        finally:
            publisher.close()
            tally.close()
    elapsed = max(time.monotonic() - started, 1e-9)
    _log.info(
        "scanner_finished",
        confirmed=tally.total,
        failed=publisher.failed,
        per_kind=dict(tally.kinds),
        seconds=round(elapsed, 2),
        rate=round(tally.total / elapsed),
    )
    if publisher.failed:
        print(
            f"mini-scan scan: error: {publisher.failed} messages not published: "
            f"{publisher.first_error}",
            file=sys.stderr,
        )
        return 1
    return 0


def _produce(
    generator: ScanGenerator,
    publisher: BatchPublisher,
    tally: _Tally,
    args: argparse.Namespace,
    stop: threading.Event,
) -> None:
    rate, count = args.rate, args.count
    interval = 1.0 / rate if rate > 0 else 0.0
    started = next_progress = time.monotonic()
    sent = 0
    while (count is None or sent < count) and not stop.is_set():
        if interval:
            # Pace against the start, not the previous message, so delays do not accumulate.
            delay = started + sent * interval - time.monotonic()
            if delay > 0 and stop.wait(delay):
                break
        publisher.publish(generator.next())
        sent += 1
        if sent % 256 == 0 or interval:
            current = time.monotonic()
            if current >= next_progress + args.progress_every:
                next_progress = current
                rate_now = round(sent / (current - started))
                _log.info("scanner_progress", sent=sent, confirmed=tally.total, rate=rate_now)


class _Tally:
    """Counts confirmed messages per kind and writes the --log lines, from publisher threads."""

    def __init__(self, log: IO[str] | None) -> None:
        self._lock = threading.Lock()
        self._log = log
        self.kinds: Counter[str] = Counter()
        self.total = 0

    def confirmed(self, messages: Sequence[ScanMessage], ids: Sequence[str]) -> None:
        lines = (
            "".join(
                json.dumps(m.record(i), separators=(",", ":")) + "\n"
                for m, i in zip(messages, ids, strict=True)
            )
            if self._log
            else ""
        )
        with self._lock:
            self.total += len(messages)
            self.kinds.update(str(m.kind) for m in messages)
            if self._log:
                self._log.write(lines)

    def close(self) -> None:
        if self._log and self._log is not sys.stdout:  # `--log -` writes to stdout: leave it open
            self._log.close()
        elif self._log:
            self._log.flush()


def _wall_clock() -> int:
    return int(time.time())
