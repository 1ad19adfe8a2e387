"""Helpers for the chaos, fault and hostile-input tests: a seeded workload with its oracle,
database outages (SQLite write lock, PostgreSQL connections cut at a proxy), dead-letter pulls."""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from google.cloud import pubsub_v1

from emulator.subscription import SubscriptionState
from emulator.testing import wait_until
from processor.schema import Observation, Reason
from processor.storage import Repository, open_engine
from processor.tests.helpers.oracle import Row, expected_rows, stored_rows
from processor.tests.helpers.pipeline import metric
from processor.tests.helpers.tcpproxy import TcpProxy, tcp_proxy
from scanner.generator import Kind, Mix, ScanGenerator, ScanMessage

# --- the workload ---------------------------------------------------------------------------


@dataclass
class Workload:
    """Messages to publish, and once published, which message id carried which message."""

    messages: list[ScanMessage]
    published: dict[str, ScanMessage] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def observations(self) -> list[Observation]:
        return [m.observation for m in self.messages if m.observation is not None]

    @property
    def malformed(self) -> list[ScanMessage]:
        return [m for m in self.messages if m.kind is Kind.MALFORMED]

    def expected_rows(self) -> list[Row]:
        return expected_rows(self.observations)

    def record(self, messages: Sequence[ScanMessage], ids: Sequence[str]) -> None:
        with self._lock:
            self.published.update(zip(ids, messages, strict=True))

    def expected_dead_letters(self) -> dict[str, str]:
        """message id -> the reason its dead letter must carry."""
        with self._lock:
            return {
                message_id: str(m.reason)
                for message_id, m in self.published.items()
                if m.reason is not None
            }


def scan_workload(
    seed: int,
    count: int,
    keys: int | None,
    *,
    duplicates: float = 0.3,
    out_of_order: float = 0.2,
    malformed: float = 0.03,
    start: int | None = None,
) -> Workload:
    """`count` messages from the scanner's own generator, shuffled with `seed`.

    The clock advances one second per message (so fresh scans do supersede older ones), the
    generator's out-of-order share is stamped up to a day earlier, and the shuffle then puts
    every timestamp out of publish order.
    """
    import random

    clock = itertools.count(start if start is not None else int(time.time()) - count)
    mix = Mix(duplicates=duplicates, out_of_order=out_of_order, malformed=malformed)
    generator = ScanGenerator(lambda: next(clock), seed=seed, keys=keys, mix=mix)
    messages = [generator.next() for _ in range(count)]
    random.Random(seed).shuffle(messages)
    return Workload(messages)


def publish_paced(
    publisher: pubsub_v1.PublisherClient,
    topic_path: str,
    workload: Workload,
    seconds: float,
    chunk: int = 500,
) -> threading.Thread:
    """Publish the workload in chunks spread over about `seconds`, in a thread; join it to wait
    until every publish is confirmed."""
    chunks = [workload.messages[i : i + chunk] for i in range(0, len(workload.messages), chunk)]
    pause = seconds / max(1, len(chunks))

    def run() -> None:
        for part in chunks:
            started = time.monotonic()
            futures = [publisher.publish(topic_path, m.data) for m in part]
            workload.record(part, [f.result(timeout=60) for f in futures])
            time.sleep(max(0.0, pause - (time.monotonic() - started)))  # pacing, not a wait

    thread = threading.Thread(target=run, name="chaos-publisher", daemon=True)
    thread.start()
    return thread


# --- database outages -----------------------------------------------------------------------


class SqliteWriteLock:
    """Makes a SQLite database unwritable for a while: another connection holds the write lock
    (`BEGIN IMMEDIATE`), as a long migration or a backup would."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._connection: sqlite3.Connection | None = None

    def begin(self) -> None:
        # Opened on first use: connecting first would create the file before the processors
        # do, in rollback-journal mode rather than WAL.
        if self._connection is None:
            self._connection = sqlite3.connect(
                self._path, timeout=60, isolation_level=None, check_same_thread=False
            )
        self._connection.execute("BEGIN IMMEDIATE")

    def end(self) -> None:
        assert self._connection is not None
        self._connection.execute("ROLLBACK")

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()


class ProxyCut:
    """Makes a database unreachable for a while: every connection through the proxy is cut and
    new ones are refused."""

    def __init__(self, proxy: TcpProxy) -> None:
        self._proxy = proxy

    def begin(self) -> None:
        self._proxy.cut()

    def end(self) -> None:
        self._proxy.restore()

    def close(self) -> None:
        self._proxy.restore()


def proxied_url(url: str, proxy_address: str) -> str:
    """The same PostgreSQL URL, reached through the proxy."""
    parsed = sa.make_url(url)
    host, port = proxy_address.rsplit(":", 1)
    return parsed.set(host=host, port=int(port)).render_as_string(hide_password=False)


def database_address(url: str) -> tuple[str, int]:
    parsed = sa.make_url(url)
    return parsed.host or "127.0.0.1", parsed.port or 5432


@contextlib.contextmanager
def repository(url: str) -> Iterator[Repository]:
    repo = Repository(open_engine(url))
    try:
        yield repo
    finally:
        repo.engine.dispose()


def table_rows(url: str) -> list[Row]:
    """The `services` table in the oracle's shape; empty before the first migration."""
    with repository(url) as repo:
        try:
            return stored_rows(repo.rows())
        except sa.exc.SQLAlchemyError:
            return []


def reaches(url: str, expected: list[Row], timeout: float) -> bool:
    return wait_until(lambda: table_rows(url) == expected, timeout=timeout, interval=0.5)


Key = tuple[str, int, str]


def stalls_before_reaching(
    url: str, expected: list[Row], progress: Callable[[], float], stall: float, timeout: float
) -> str | None:
    """None once the table is the oracle; otherwise why not: `progress()` (e.g. the acked count)
    stood still for `stall` seconds with rows still missing, or `timeout` passed."""
    start = last_change = time.monotonic()
    last = progress()
    while table_rows(url) != expected:
        now, value = time.monotonic(), progress()
        if value != last:
            last, last_change = value, now
        elif now - last_change >= stall:
            return f"no progress for {stall:.0f} s (at {last:.0f}, {now - start:.0f} s in)"
        if now - start >= timeout:
            return f"not there after {timeout:.0f} s"
        time.sleep(0.5)
    return None


def describe_difference(
    url: str, expected: list[Row], explain: Callable[[], Callable[[list[Key]], str]] | None = None
) -> str:
    """A short account of how the table differs from the oracle, for assertion messages.

    With `explain` (a `DeliveryReport`), also why: its snapshot of the broker is taken before
    the table is read, so a message it saw acked (commit comes before ack) and whose row the
    table lacks was truly lost, not merely committed in between."""
    account = explain() if explain is not None else None
    stored = table_rows(url)
    by_key = {row[:3]: row for row in stored}
    want = {row[:3]: row for row in expected}
    missing = [k for k in want if k not in by_key]
    extra = [k for k in by_key if k not in want]
    wrong = [(want[k], by_key[k]) for k in want if k in by_key and want[k] != by_key[k]]
    summary = (
        f"{len(stored)} rows vs {len(expected)} expected; missing {len(missing)} {missing[:3]}, "
        f"extra {len(extra)} {extra[:3]}, different {len(wrong)} {wrong[:2]}"
    )
    unexplained = missing + [row[:3] for row, _ in wrong]
    if account is None or not unexplained:
        return summary
    return f"{summary}\n{account(unexplained)}"


@dataclass
class DeliveryReport:
    """Explains keys the table lacks from our emulator's side (after `state.start_trace()`) and
    the processor's counters: where each of their messages is (ready, leased: on which stream,
    for how long; nowhere) and its history (deliveries, extensions, acks, expiries, stream
    ends). A message acked but never stored was lost; one ready, leased or in backoff is late.
    Calling it takes the snapshot; calling the result with the keys words the account."""

    state: SubscriptionState
    workload: Workload
    metrics_port: int | None = None
    examples: int = 4

    def __call__(self) -> Callable[[list[Key]], str]:
        with self.workload._lock:
            published = dict(self.workload.published)
        snapshot = self.state.whereabouts(published)
        subscription = self.state.describe()
        counters = processor_counters(self.metrics_port) if self.metrics_port else None
        trace = self.state.trace
        clock = (
            f"(trace clock at {trace.now()}, last ack at {trace.last_ack or 0:.2f}s"
            f"{', trace full' if trace.full else ''})"
            if trace
            else ""
        )

        def account(keys: list[Key]) -> str:
            wanted = set(keys)
            carriers = sorted(
                (
                    mid
                    for mid, m in published.items()
                    if m.observation and m.observation.key in wanted
                ),
                key=lambda mid: int(mid) if mid.isdigit() else 0,
            )
            verdicts = {mid: _verdict(*snapshot[mid]) for mid in carriers}
            counts = Counter(verdicts.values())
            deliveries = Counter(
                sum(" delivered " in event for event in snapshot[mid][1]) for mid in carriers
            )
            lines = [
                f"{len(carriers)} messages carry those keys: {dict(counts.most_common())}; "
                f"deliveries per message: {dict(sorted(deliveries.items()))}",
                f"subscription: {subscription}",
            ]
            if counters is not None:
                lines.append(f"processor: {counters}")
            if trace is None:
                lines.append("(no delivery history: call start_trace() before publishing)")
            for verdict in counts:  # a few examples of each kind
                for mid in [m for m in carriers if verdicts[m] == verdict][: self.examples]:
                    place, history = snapshot[mid]
                    lines.append(f"  message {mid} ({verdict}): now {place}; {_shorten(history)}")
            lines.append(clock)
            return "\n".join(lines)

        return account


def _shorten(history: list[str], head: int = 6, tail: int = 3) -> str:
    if len(history) <= head + tail:
        return "; ".join(history)
    skipped = len(history) - head - tail
    return "; ".join([*history[:head], f"({skipped} more)", *history[-tail:]])


def _verdict(place: str, history: list[str]) -> str:
    """lost (acked, never stored), late (ready, leased, in backoff), or dead-lettered."""
    if place.startswith("leased"):
        return "late: leased on a closed stream" if "(closed)" in place else "late: leased"
    if not place.startswith("nowhere"):
        return f"late: {place.split(' (', 1)[0]}"
    last = history[-1] if history else ""
    if "acked" in last and "ignored" not in last:
        return "lost: acked"
    if "redelivery after" in last:
        return "late: in backoff"
    if "dead-letter" in last:
        return "dead-lettered"
    return "unknown: no history"


def processor_counters(metrics_port: int) -> dict[str, float]:
    """The processor's message counters, what it holds now and its stream reconnects."""
    names = ("received", "acked", "nacked", "dead_lettered")
    counters = {n: metric(metrics_port, f"mini_scan_messages_{n}_total") for n in names}
    return counters | {
        "held": metric(metrics_port, "mini_scan_messages_held"),
        "reconnects": metric(metrics_port, "mini_scan_stream_reconnects_total"),
    }


# --- dead letters ---------------------------------------------------------------------------


def pull_dead_letters(
    subscription_path: str,
    done: Callable[[list[Any]], bool],
    timeout: float,
    settle: float = 2.0,
) -> list[Any]:
    """Pull (and ack) dead letters until `done(received)` or `timeout`; then keep pulling for
    `settle` seconds, so that anything unexpected arriving behind them is seen too."""
    subscriber = pubsub_v1.SubscriberClient()
    received: list[Any] = []

    def pull() -> None:
        response = subscriber.pull(subscription=subscription_path, max_messages=1000, timeout=5)
        if response.received_messages:
            subscriber.acknowledge(
                subscription=subscription_path,
                ack_ids=[m.ack_id for m in response.received_messages],
            )
            received.extend(m.message for m in response.received_messages)

    def pulled_enough() -> bool:
        pull()
        return done(received)

    try:
        wait_until(pulled_enough, timeout=timeout, interval=0.0)
        wait_until(lambda: pull() and False, timeout=settle, interval=0.0)
    finally:
        subscriber.close()
    return received


def reasons_by_source(letters: list[Any]) -> dict[str, list[str]]:
    """source message id -> the reason of each of its dead letters (normally exactly one)."""
    found: dict[str, list[str]] = {}
    for letter in letters:
        source = letter.attributes.get("source_message_id", f"<no source: {letter.message_id}>")
        found.setdefault(source, []).append(letter.attributes.get("reason", "<no reason>"))
    return found


def covers(expected: dict[str, str]) -> Callable[[list[Any]], bool]:
    """`done` for `pull_dead_letters`: every expected source message id has arrived."""
    return lambda letters: set(expected) <= set(reasons_by_source(letters))


def unexpected_letters(
    letters: list[Any], expected: dict[str, str], repeats: bool = False
) -> dict[str, list[str]]:
    """Dead letters that are not the expected message with its expected reason, once. With
    `repeats`, where processors were SIGKILLed, the same letter may come more than once (a kill
    between a dead letter's confirmation and its ack sends it again: at-least-once)."""
    return {
        source: reasons
        for source, reasons in reasons_by_source(letters).items()
        if source not in expected
        or (set(reasons) != {expected[source]} if repeats else reasons != [expected[source]])
    }


def sent_twice_per_delivery(
    letters: list[Any], deliveries: Counter[str], silences: int
) -> dict[str, str]:
    """Source messages with more dead letters than their deliveries allow. A dead letter is
    published once per delivery of its message, again only when the message comes back (a
    kill, a lost ack, a lapsed lease), plus at most once per silent connection: a Publish the
    emulator stored whose response the silence swallowed is sent again by the client library.
    More than that means one delivery was dead-lettered twice."""
    return {
        source: f"{len(reasons)} dead letters, {deliveries[source]} deliveries, {silences} silences"
        for source, reasons in reasons_by_source(letters).items()
        if len(reasons) > deliveries[source] + silences
    }


# Where the emulator's deliveries cannot be counted (compose): a SIGKILL can repeat only the
# dead letters confirmed in the moment before it whose acks had not left yet, a handful.
REPEATS_PER_KILL = 10


def repeated_letters(letters: list[Any]) -> int:
    """Dead letters beyond the first of their source message."""
    return sum(len(reasons) - 1 for reasons in reasons_by_source(letters).values())


STORAGE_REJECTED = str(Reason.STORAGE_REJECTED)


class ProxyStall(ProxyCut):
    """Makes a database stop answering: connections through the proxy stay open, but no byte
    is forwarded (a network that silently drops packets, a frozen server)."""

    def begin(self) -> None:
        self._proxy.stall()


@contextlib.contextmanager
def database_outage(
    url: str, stall: bool = False
) -> Iterator[tuple[str, ProxyCut | SqliteWriteLock]]:
    """A URL for the processor and a way to make that database unwritable: another connection
    holding SQLite's write lock (writes wait for it), or PostgreSQL's connections cut at a TCP
    proxy (or, with `stall`, left open with nothing forwarded)."""
    if url.startswith("sqlite"):
        lock = SqliteWriteLock(url.removeprefix("sqlite:///"))
        try:
            yield url, lock
        finally:
            lock.close()
        return
    with tcp_proxy(*database_address(url)) as proxy:
        yield proxied_url(url, proxy.address), (ProxyStall if stall else ProxyCut)(proxy)


def refuse(url: str, name: str, column: str, test: str) -> None:
    """Make the table refuse rows whose `column` passes `test` (SQL), as a migration could: a
    CHECK constraint on PostgreSQL (not validated on the rows already stored), triggers raising
    ABORT on SQLite (an IntegrityError, as a CHECK gives; SQLite cannot add a CHECK)."""
    engine = open_engine(url)
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(
                f"ALTER TABLE services ADD CONSTRAINT {name} CHECK (NOT ({column} {test})) "
                "NOT VALID"
            )
        else:
            for event in ("INSERT", "UPDATE"):
                connection.exec_driver_sql(
                    f"CREATE TRIGGER {name}_{event.lower()} BEFORE {event} ON services "
                    f"WHEN NEW.{column} {test} "
                    f"BEGIN SELECT RAISE(ABORT, '{name} refuses the row'); END"
                )
    engine.dispose()


def allow(url: str, name: str) -> None:
    """Undo `refuse`."""
    engine = open_engine(url)
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"ALTER TABLE services DROP CONSTRAINT {name}")
        else:
            for event in ("insert", "update"):
                connection.exec_driver_sql(f"DROP TRIGGER {name}_{event}")
    engine.dispose()


# --- Pub/Sub faults -------------------------------------------------------------------------


class PubSubFaults:
    """The faults between processors and Pub/Sub, one at a time at random: the connections open
    now go silent (no FIN, no RST; new ones pass), the open streams go deaf, or Acknowledge
    calls are held past a lease for a few seconds."""

    KINDS = ("silent_connections", "deaf_streams", "slow_acks")

    def __init__(self, proxy: TcpProxy, faults: Any) -> None:
        self._proxy, self._faults = proxy, faults
        self.struck: dict[str, int] = dict.fromkeys(self.KINDS, 0)

    def strike(self, rng: Any) -> str:
        kind = rng.choice(self.KINDS)
        if kind == "silent_connections":
            self._proxy.silence()
        elif kind == "deaf_streams":
            self._faults.silence_streams()
        else:
            self._faults.hold("Acknowledge", delay=rng.uniform(5.0, 25.0), for_seconds=2.0)
        self.struck[kind] += 1
        return kind
