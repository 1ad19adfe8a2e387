"""`mini-scan dlq list | replay`: look at dead letters, and send chosen ones back for another try.

Both read the dead-letter subscription a pull at a time, each pull sized so that it fits the
memory budget even if every message is as large as Pub/Sub allows, and keep nothing of a pull
but what they need: `list` counts and short excerpts, `replay` ack ids. `list` consumes nothing.
`replay` republishes what its filter chooses (`--reason`, `--message-id`, or `--all`) to the main
topic without the dead-lettering's attributes, and acks each dead letter only once its republish
is confirmed; everything else is handed back at the end. A copy without a reason (forwarded by
Pub/Sub's own dead-letter policy) is replayed only with `--force`, a truncated copy never.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from google.api_core import exceptions as google_exceptions
from google.cloud import pubsub_v1
from rich.console import Console
from rich.table import Table

from processor.commands import run_command
from processor.commands.inert import cell
from processor.config import ArgumentParser, PubSubSettings, add_arguments, load
from processor.errors import ConfigError, PubSubError, first_line
from processor.pipeline.deadletter import POLICY_PREFIX, is_reserved
from processor.runtime.logs import excerpt
from processor.runtime.pubsub import ack_id_chunks, subscriber_client
from processor.stopping import Stopped, stop_on_signals

MAX_DEAD_LETTER_BYTES = 10_000_000  # the largest message Pub/Sub accepts
_LEASE_SECONDS = 600  # long enough to read a large backlog without it coming back mid-read
_CONFIRM_SECONDS = 60  # how long replay waits for a pull's republishes to be confirmed
_EXCERPT_CHARS = 80


def reason_of(attributes: Mapping[str, str]) -> str | None:
    """The reason the processor gave a dead letter, or None. A copy Pub/Sub's dead-letter policy
    forwarded carries its publisher's attributes only: a `reason` there was not ours."""
    if any(key.startswith(POLICY_PREFIX) for key in attributes):
        return None
    return attributes.get("reason") or None


def read_dead_letters(
    subscriber: pubsub_v1.SubscriberClient,
    subscription: str,
    limit: int,
    budget_bytes: int,
    take: Callable[[list[Any]], None],
    leased: set[str],
    stop: threading.Event,
) -> None:
    """Pull up to `limit` dead letters and keep them leased (their ack ids added to `leased`),
    handing each pull to `take`. A pull asks for at most `budget_bytes` / 10 MB messages, so it
    fits the budget whatever is on the subscription. Raises `Stopped` between pulls once `stop`
    is set (never mid-pull: a pull left waiting would lease what was handed back)."""
    per_pull = max(1, min(1000, budget_bytes // MAX_DEAD_LETTER_BYTES))
    read = 0
    while read < limit:
        if stop.is_set():
            raise Stopped("stopped while reading dead letters")
        response = subscriber.pull(
            request={"subscription": subscription, "max_messages": min(per_pull, limit - read)},
            timeout=30,
        )
        messages = list(response.received_messages)
        del response
        if not messages:
            break
        ack_ids = [m.ack_id for m in messages]
        leased.update(ack_ids)
        subscriber.modify_ack_deadline(
            request={
                "subscription": subscription,
                "ack_ids": ack_ids,
                "ack_deadline_seconds": _LEASE_SECONDS,
            }
        )
        read += len(messages)
        take(messages)


def hand_back(
    subscriber: pubsub_v1.SubscriberClient, subscription: str, ack_ids: Sequence[str] | set[str]
) -> None:
    for chunk in ack_id_chunks(list(ack_ids)):
        subscriber.modify_ack_deadline(
            request={
                "subscription": subscription,
                "ack_ids": chunk,
                "ack_deadline_seconds": 0,
            }
        )


class Summary:
    """Counts by reason and a few short excerpts per reason: all `list` keeps of a dead letter."""

    def __init__(self, samples: int) -> None:
        self._samples = samples
        self.total = 0
        self.by_reason: Counter[str] = Counter()
        self.examples: dict[str, list[dict[str, Any]]] = {}

    def add(self, messages: list[Any]) -> None:
        for m in messages:
            attributes = m.message.attributes
            reason = reason_of(attributes) or "unknown"
            self.total += 1
            self.by_reason[reason] += 1
            if len(self.examples.setdefault(reason, [])) < self._samples:
                self.examples[reason].append(
                    {
                        "message_id": m.message.message_id,
                        "error": excerpt(attributes.get("error", ""), _EXCERPT_CHARS),
                        "size": len(m.message.data),
                        "data": excerpt(m.message.data, _EXCERPT_CHARS),
                    }
                )

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "by_reason": dict(self.by_reason.most_common()),
            "samples": self.examples,
        }


def republish(
    publisher: pubsub_v1.PublisherClient, topic: str, chosen: list[Any], stop: threading.Event
) -> tuple[list[str], list[str]]:
    """Publish each chosen dead letter's data and original attributes to `topic`; the ack ids
    of those confirmed, and of the others (failed, or unconfirmed when `stop` was set)."""
    futures = [
        publisher.publish(
            topic,
            m.message.data,
            **{k: v for k, v in m.message.attributes.items() if not is_reserved(k)},
        )
        for m in chosen
    ]
    deadline, pending = time.monotonic() + _CONFIRM_SECONDS, set(futures)
    while pending and not stop.is_set() and time.monotonic() < deadline:
        pending = concurrent.futures.wait(pending, timeout=0.2).not_done
    confirmed: list[str] = []
    failed: list[str] = []
    for m, future in zip(chosen, futures, strict=True):
        ok = future.done() and future.exception() is None
        (confirmed if ok else failed).append(m.ack_id)
    return confirmed, failed


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Inspect and replay dead letters.")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="counts by reason and excerpts; consumes nothing")
    listing.add_argument("--samples", type=int, default=3, help="samples per reason")
    listing.add_argument("--max", type=int, default=10_000, help="dead letters to read at most")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    again = commands.add_parser(
        "replay",
        help="republish chosen dead letters to the main topic",
        description="Choose with --reason and/or --message-id, or take every one with --all.",
    )
    again.add_argument("--reason", help="only those with this reason (unknown: without one)")
    again.add_argument(
        "--message-id",
        action="append",
        help="only this dead letter (its message id, or its source_message_id); repeatable",
    )
    again.add_argument("--all", action="store_true", help="every dead letter read")
    again.add_argument(
        "--force",
        action="store_true",
        help="also replay copies without a reason (forwarded by Pub/Sub's dead-letter policy)",
    )
    again.add_argument("--dry-run", action="store_true", help="count, republish nothing")
    again.add_argument("--limit", type=int, default=1000, help="read at most this many")
    for sub in (listing, again):
        sub.add_argument(
            "--budget-mb",
            type=int,
            default=100,
            help="dead-letter data held at once, in MB (100): a pull asks for at most "
            "budget / 10 MB messages",
        )
        add_arguments(sub, PubSubSettings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    return run_command(parser, lambda args: _dlq(parser.prog, args), argv)


def _dlq(prog: str, args: argparse.Namespace) -> int:
    settings = load(PubSubSettings, args)
    if args.budget_mb < 1:
        raise ConfigError("--budget-mb must be at least 1")
    if args.command == "replay" and args.all == bool(args.reason or args.message_id):
        raise ConfigError(
            "say what to replay: --reason R and/or --message-id ID, or --all (not both)"
        )
    settings.apply_emulator_host()
    subscriber = subscriber_client()  # dead letters can be as large as any message: 10 MB
    subscription = settings.dead_letter_subscription_path
    leased: set[str] = set()
    try:
        with stop_on_signals() as stop:
            if args.command == "list":
                return _list(args, subscriber, subscription, leased, stop)
            return _replay(args, settings, subscriber, leased, stop)
    except Stopped as exc:
        # Not done: hand every lease back now instead of in 10 minutes.
        with contextlib.suppress(google_exceptions.GoogleAPIError):
            hand_back(subscriber, subscription, leased)
        print(f"{prog}: {exc}; the rest stays on {subscription}", file=sys.stderr)
        return stop.exit_code()
    except google_exceptions.GoogleAPIError as exc:
        raise PubSubError(first_line(exc)) from exc
    finally:
        subscriber.close()


def _list(
    args: argparse.Namespace,
    subscriber: pubsub_v1.SubscriberClient,
    subscription: str,
    leased: set[str],
    stop: threading.Event,
) -> int:
    summary = Summary(args.samples)
    budget = args.budget_mb * 1_000_000
    read_dead_letters(subscriber, subscription, args.max, budget, summary.add, leased, stop)
    hand_back(subscriber, subscription, leased)
    _print_summary(summary.as_dict(), args.json)
    return 0


def _verdict(m: Any, args: argparse.Namespace) -> str:
    """What replay does with one dead letter: replay, or why not."""
    attributes = m.message.attributes
    reason = reason_of(attributes)
    if args.reason is not None and (reason or "unknown") != args.reason:
        return "unmatched"
    ids = {m.message.message_id, attributes.get("source_message_id")}
    if args.message_id and not ids & set(args.message_id):
        return "unmatched"
    if reason is None and not args.force:
        return "without_reason"
    # A copy cut to fit (processor/pipeline/deadletter.py) no longer holds the original message.
    if reason is not None and attributes.get("truncated") == "true":
        return "truncated"
    return "replay"


def _replay(
    args: argparse.Namespace,
    settings: PubSubSettings,
    subscriber: pubsub_v1.SubscriberClient,
    leased: set[str],
    stop: threading.Event,
) -> int:
    subscription = settings.dead_letter_subscription_path
    publisher = pubsub_v1.PublisherClient()
    tally: Counter[str] = Counter()

    def take(messages: list[Any]) -> None:
        chosen = []
        for m in messages:
            verdict = _verdict(m, args)
            tally[verdict] += 1
            if verdict == "replay":
                chosen.append(m)
        if args.dry_run or not chosen:
            return
        confirmed, failed = republish(publisher, settings.topic_path, chosen, stop)
        for chunk in ack_id_chunks(confirmed):
            subscriber.acknowledge(request={"subscription": subscription, "ack_ids": chunk})
        leased.difference_update(confirmed)
        tally["replayed"] += len(confirmed)
        tally["failed"] += len(failed)
        if stop.is_set():
            raise Stopped(f"stopped after replaying {tally['replayed']}")

    budget = args.budget_mb * 1_000_000
    read_dead_letters(subscriber, subscription, args.limit, budget, take, leased, stop)
    hand_back(subscriber, subscription, leased)
    print(_replay_report(tally, settings.topic_path, args.dry_run))
    return 0 if not tally["failed"] else 1


def _replay_report(tally: Counter[str], topic: str, dry_run: bool) -> str:
    if dry_run:
        line = f"would replay {tally['replay']} dead letter(s) to {topic} (dry run: nothing sent)"
    else:
        line = f"replayed {tally['replayed']} dead letter(s) to {topic}; {tally['failed']} failed"
    if tally["truncated"]:
        line += f"; {tally['truncated']} truncated copies kept, not replayable"
    if tally["without_reason"]:
        line += (
            f"; {tally['without_reason']} without a reason kept (forwarded by Pub/Sub's "
            "dead-letter policy: --force replays them)"
        )
    return line


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
        return
    table = Table(title=f"{summary['total']} dead letter(s)")
    for column in ("reason", "count", "sample message id", "error", "bytes", "data (excerpt)"):
        table.add_column(column)
    # Every value here came from whoever published the message: inert text only.
    for reason, count in summary["by_reason"].items():
        for i, sample in enumerate(summary["samples"][reason]):
            table.add_row(
                cell(reason) if i == 0 else "",
                str(count) if i == 0 else "",
                cell(sample["message_id"]),
                cell(sample["error"]),
                str(sample["size"]),
                cell(sample["data"]),
            )
    Console().print(table)
