"""`mini-scan dlq list | replay`: look at dead letters, and send them back for another try.

`list` leases what it reads and hands it all back at the end, so nothing is consumed.
`replay` republishes the chosen dead letters to the main topic (without the attributes the
dead-lettering added) and acks each on the dead-letter subscription only once its republish is
confirmed; everything else is handed back.
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
from collections.abc import Callable, Sequence
from typing import Any

from google.api_core import exceptions as google_exceptions
from google.cloud import pubsub_v1
from rich.console import Console
from rich.table import Table

from processor.commands import run_command
from processor.config import ArgumentParser, PubSubSettings, add_arguments, load
from processor.errors import PubSubError, first_line
from processor.runtime.logs import excerpt
from processor.runtime.pubsub import ack_id_chunks, subscriber_client
from processor.stopping import Stopped, stop_on_signals

# Attributes added by the processor's dead-lettering and by Pub/Sub's dead-letter policy.
_ADDED = {
    "reason",
    "error",
    "source_subscription",
    "source_message_id",
    "source_publish_time",
    "dropped_attributes",
}
_ADDED_PREFIX = "CloudPubSubDeadLetterSource"
_LEASE_SECONDS = 600  # long enough to read a large backlog without it coming back mid-read
_CONFIRM_SECONDS = 60  # how long replay waits for its republishes to be confirmed


def read_dead_letters(
    subscriber: pubsub_v1.SubscriberClient,
    subscription: str,
    limit: int,
    received: list[Any] | None = None,
    stop: threading.Event | None = None,
) -> list[Any]:
    """Pull up to `limit` dead letters into `received` (a new list by default) and keep them
    leased; the caller acks or hands back. Raises `Stopped` between pulls once `stop` is set
    (never mid-pull: a pull left waiting would lease what was handed back)."""
    received = [] if received is None else received
    while len(received) < limit:
        if stop is not None and stop.is_set():
            raise Stopped("stopped while reading dead letters")
        response = subscriber.pull(
            request={
                "subscription": subscription,
                "max_messages": min(1000, limit - len(received)),
            },
            timeout=30,
        )
        if not response.received_messages:
            break
        received.extend(response.received_messages)
        subscriber.modify_ack_deadline(
            request={
                "subscription": subscription,
                "ack_ids": [m.ack_id for m in response.received_messages],
                "ack_deadline_seconds": _LEASE_SECONDS,
            }
        )
    return received


def hand_back(
    subscriber: pubsub_v1.SubscriberClient, subscription: str, ack_ids: list[str]
) -> None:
    for chunk in ack_id_chunks(ack_ids):
        subscriber.modify_ack_deadline(
            request={
                "subscription": subscription,
                "ack_ids": chunk,
                "ack_deadline_seconds": 0,
            }
        )


def summarize(received: list[Any], samples: int) -> dict[str, Any]:
    counts = Counter(m.message.attributes.get("reason", "unknown") for m in received)
    examples: dict[str, list[dict[str, str]]] = {}
    for m in received:
        reason = m.message.attributes.get("reason", "unknown")
        if len(examples.setdefault(reason, [])) < samples:
            examples[reason].append(
                {
                    "message_id": m.message.message_id,
                    "error": m.message.attributes.get("error", ""),
                    "data": excerpt(m.message.data, 80),
                }
            )
    return {"total": len(received), "by_reason": dict(counts.most_common()), "samples": examples}


def replay(
    subscriber: pubsub_v1.SubscriberClient,
    publisher: pubsub_v1.PublisherClient,
    settings: PubSubSettings,
    received: list[Any],
    wanted: Callable[[Any], bool],
    stop: threading.Event,
) -> tuple[int, int]:
    """Republish the wanted dead letters; returns (replayed, failed). Unwanted ones are handed
    back; a failed republish leaves its dead letter on the subscription. Once `stop` is set it
    acks those already confirmed and raises `Stopped` (the caller hands back the rest)."""
    chosen = [m for m in received if wanted(m)]
    hand_back(
        subscriber,
        settings.dead_letter_subscription_path,
        [m.ack_id for m in received if not wanted(m)],
    )
    futures = []
    for m in chosen:
        attributes = {
            k: v
            for k, v in m.message.attributes.items()
            if k not in _ADDED and not k.startswith(_ADDED_PREFIX)
        }
        futures.append(publisher.publish(settings.topic_path, m.message.data, **attributes))
    deadline, pending = time.monotonic() + _CONFIRM_SECONDS, set(futures)
    while pending and not stop.is_set() and time.monotonic() < deadline:
        pending = concurrent.futures.wait(pending, timeout=0.2).not_done
    confirmed, failed = [], []
    for m, future in zip(chosen, futures, strict=True):
        ok = future.done() and future.exception() is None
        (confirmed if ok else failed).append(m.ack_id)
    for chunk in ack_id_chunks(confirmed):
        subscriber.acknowledge(
            request={
                "subscription": settings.dead_letter_subscription_path,
                "ack_ids": chunk,
            }
        )
    if stop.is_set():
        raise Stopped(f"stopped after replaying {len(confirmed)} of {len(chosen)}")
    hand_back(subscriber, settings.dead_letter_subscription_path, failed)
    return len(confirmed), len(failed)


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description="Inspect and replay dead letters.")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="counts by reason and samples; consumes nothing")
    listing.add_argument("--samples", type=int, default=3, help="samples per reason")
    listing.add_argument("--max", type=int, default=10_000, help="dead letters to read at most")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    again = commands.add_parser("replay", help="republish dead letters to the main topic")
    again.add_argument("--reason", help="only those with this reason (default: all)")
    again.add_argument("--limit", type=int, default=1000, help="replay at most this many")
    for sub in (listing, again):
        add_arguments(sub, PubSubSettings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    return run_command(parser, lambda args: _dlq(parser.prog, args), argv)


def _dlq(prog: str, args: argparse.Namespace) -> int:
    settings = load(PubSubSettings, args)
    settings.apply_emulator_host()
    subscriber = subscriber_client()  # dead letters can be as large as any message: 10 MB
    subscription = settings.dead_letter_subscription_path
    leased: list[Any] = []
    try:
        with stop_on_signals() as stop:
            return _run(args, settings, subscriber, leased, stop)
    except Stopped as exc:
        # Not done: hand every lease back now (acked ones are ignored) instead of in 10 minutes.
        with contextlib.suppress(google_exceptions.GoogleAPIError):
            hand_back(subscriber, subscription, [m.ack_id for m in leased])
        print(f"{prog}: {exc}; the rest stays on {subscription}", file=sys.stderr)
        return stop.exit_code()
    except google_exceptions.GoogleAPIError as exc:
        raise PubSubError(first_line(exc)) from exc
    finally:
        subscriber.close()


def _run(
    args: argparse.Namespace,
    settings: PubSubSettings,
    subscriber: pubsub_v1.SubscriberClient,
    leased: list[Any],
    stop: threading.Event,
) -> int:
    subscription = settings.dead_letter_subscription_path
    if args.command == "list":
        received = read_dead_letters(subscriber, subscription, args.max, leased, stop)
        hand_back(subscriber, subscription, [m.ack_id for m in received])
        _print_summary(summarize(received, args.samples), args.json)
        return 0
    received = read_dead_letters(subscriber, subscription, args.limit, leased, stop)
    reason = {m.ack_id: m.message.attributes.get("reason") for m in received}
    chosen = {ack_id for ack_id, why in reason.items() if args.reason in (None, why)}
    # A copy cut to fit (see processor/pipeline/deadletter.py) no longer holds the original message.
    truncated = {m.ack_id for m in received if m.message.attributes.get("truncated") == "true"}
    truncated &= chosen
    replayed, failed = replay(
        subscriber,
        pubsub_v1.PublisherClient(),
        settings,
        received,
        lambda m: m.ack_id in chosen and m.ack_id not in truncated,
        stop,
    )
    kept = f"; {len(truncated)} truncated copies kept, not replayable" if truncated else ""
    print(f"replayed {replayed} dead letter(s) to {settings.topic_path}; {failed} failed{kept}")
    return 0 if not failed else 1


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
        return
    table = Table(title=f"{summary['total']} dead letter(s)")
    for column in ("reason", "count", "sample message id", "error", "data"):
        table.add_column(column)
    for reason, count in summary["by_reason"].items():
        for i, sample in enumerate(summary["samples"][reason]):
            table.add_row(
                reason if i == 0 else "",
                str(count) if i == 0 else "",
                sample["message_id"],
                sample["error"],
                sample["data"],
            )
    Console().print(table)
