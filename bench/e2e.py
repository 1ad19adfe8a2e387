"""End to end: how fast a backlog drains through the processor, against the consumers' ceilings.

For each row below, publishes N messages of the reference distribution (the scanner's generator)
to a fresh subscription, then drains it in a child process of its own (so peak RSS is that
consumer's alone), while our emulator runs in another process; publish-to-commit lag thus
includes the few seconds of preloading, alike for all:

  (a) the client library's subscribe(), acking only, same streams and flow control, at the
      client's own defaults (its default executor, none of the processor's runtime tuning);
  (e) the batch-native consumer (CONSUMER=batch), acking only: its ceiling;
  (b) the processor on SQLite;   (c) the processor on PostgreSQL   (both CONSUMER=batch);
  (f) the processor on SQLite with CONSUMER=client;
  (d) the common design: one transaction and one ack per message inside the callback (SQLite,
      same engine settings), timed on the first --common-count messages: it is that slow;
  (p) decode + upsert_many in BATCH_SIZE batches on SQLite, no Pub/Sub: the pipeline's own limit.

    uv run python -m bench.e2e [--messages 200000] [--streams 2] [--postgres URL]
    uv run python -m bench.e2e --scaling [--messages 200000]   # 1, 2, 4 processor processes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from google.cloud import pubsub_v1
from rich.console import Console
from rich.table import Table

from emulator.testing import emulator_process, wait_until
from processor.schema import decode
from scanner.generator import ScanGenerator, ScanMessage
from scanner.publisher import BatchPublisher

PROJECT = "bench"
DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def preload(count: int, name: str) -> str:
    """A fresh topic and subscription holding `count` messages from the scanner's generator
    (the reference distribution), published in batches; returns the subscription."""
    return publish(reference_messages(count), name)


def publish(messages: Iterable[ScanMessage], name: str) -> str:
    """A fresh topic and subscription holding `messages`, published in batches; returns the
    subscription (a backlog for a child of `run_child` to drain)."""
    topic, subscription = fresh_subscription(name)
    publisher = BatchPublisher(pubsub_v1.PublisherClient(), topic, on_confirmed=lambda *_: None)
    for body in messages:
        publisher.publish(body)
    publisher.close()
    if publisher.failed:
        raise RuntimeError(f"preload failed: {publisher.first_error}")
    return subscription


def fresh_subscription(name: str) -> tuple[str, str]:
    """A new topic and a subscription on it: (topic, subscription)."""
    run = uuid.uuid4().hex[:8]
    client = pubsub_v1.PublisherClient()
    topic = client.create_topic(name=f"projects/{PROJECT}/topics/{name}-{run}").name
    subscription = (
        pubsub_v1.SubscriberClient()
        .create_subscription(
            request={
                "name": f"projects/{PROJECT}/subscriptions/{name}-{run}",
                "topic": topic,
                "ack_deadline_seconds": 60,
            }
        )
        .name
    )
    return topic, subscription


def reference_messages(count: int) -> list[ScanMessage]:
    """`count` messages of the reference distribution (the scanner's generator, seed 1)."""
    generator = ScanGenerator(lambda: int(time.time()), seed=1)
    return [generator.next() for _ in range(count)]


# ---- children: each drains one subscription and prints one JSON line -------------------------


def _percentiles(lags: list[float]) -> tuple[float, float]:
    ordered = sorted(lags)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


class _Recorded:
    """The processor's lag histogram, also keeping every value: exact percentiles."""

    def __init__(self, histogram: Any) -> None:
        self._histogram, self.values = histogram, []

    def observe_many(self, values: list[float]) -> None:
        self.values += values
        self._histogram.observe_many(values)


def _subscribe_and_wait(
    subscription: str,
    callback: Any,
    args: argparse.Namespace,
    done: threading.Event,
) -> tuple[float, float]:
    """The client at its own defaults (its default executor: ten callback threads per stream),
    with the processor's streams and flow control."""
    streams, max_messages = args.streams, args.max_messages
    subscriber = pubsub_v1.SubscriberClient()
    flow = pubsub_v1.types.FlowControl(max_messages=max_messages)
    started, cpu = time.perf_counter(), time.process_time()
    futures = [
        subscriber.subscribe(subscription, callback, flow_control=flow) for _ in range(streams)
    ]
    done.wait(timeout=3600)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    for future in futures:
        future.cancel()
    return elapsed, cpu


def child_ack_only(args: argparse.Namespace) -> dict[str, Any]:
    lags: list[float] = []
    done = threading.Event()
    lock = threading.Lock()

    def callback(message: Any) -> None:
        message.ack()
        with lock:
            lags.append(time.time() - message.publish_time.timestamp())
            if len(lags) >= args.count:
                done.set()

    elapsed, cpu = _subscribe_and_wait(args.subscription, callback, args, done)
    p50, p99 = _percentiles(lags)
    return {"messages": len(lags), "seconds": elapsed, "cpu": cpu, "p50": p50, "p99": p99}


def _settings(args: argparse.Namespace, consumer: str) -> Any:
    from processor.config import ProcessorSettings

    return ProcessorSettings(
        pubsub_project_id=PROJECT,
        pubsub_subscription=args.subscription.rsplit("/", 1)[1],
        database_url=args.database_url or "sqlite://",
        streams=args.streams,
        max_messages=args.max_messages,
        callback_threads=args.callback_threads,
        metrics_port=0,
        consumer=consumer,
    )


def child_batch_ack_only(args: argparse.Namespace) -> dict[str, Any]:
    from processor.pipeline.streaming_pull import StreamingPull
    from processor.runtime.metrics import Metrics
    from processor.runtime.pubsub import subscriber_client

    lags: list[float] = []
    done = threading.Event()
    lock = threading.Lock()

    def handle(received: list[Any]) -> None:
        pull.ack(received)
        now = time.time()
        with lock:
            lags.extend(now - message.publish_time for message in received)
            if len(lags) >= args.count:
                done.set()

    pull = StreamingPull(_settings(args, "batch"), subscriber_client(), Metrics(), handle)
    started, cpu = time.perf_counter(), time.process_time()
    pull.start()
    done.wait(timeout=3600)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    pull.close(5)
    p50, p99 = _percentiles(lags)
    return {"messages": len(lags), "seconds": elapsed, "cpu": cpu, "p50": p50, "p99": p99}


def child_processor(args: argparse.Namespace, consumer: str = "batch") -> dict[str, Any]:
    from processor.commands.process import bootstrap
    from processor.runtime.logs import configure_logging
    from processor.runtime.metrics import Metrics

    configure_logging("WARNING", "json")
    settings = _settings(args, consumer)
    metrics = Metrics()
    lags = _Recorded(metrics.lag_seconds)
    metrics.lag_seconds = lags  # type: ignore[assignment]
    processor = bootstrap(settings, metrics)
    started, cpu = time.perf_counter(), time.process_time()
    processor.start()
    wait_until(lambda: metrics.acked._value.get() >= args.count, timeout=3600, interval=0.01)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    processor.shutdown(5)
    p50, p99 = _percentiles(lags.values)
    messages = int(metrics.acked._value.get())
    return {"messages": messages, "seconds": elapsed, "cpu": cpu, "p50": p50, "p99": p99}


def child_common(args: argparse.Namespace) -> dict[str, Any]:
    from processor.storage import Repository, migrate, open_engine

    engine = open_engine(args.database_url, pool_size=20)
    migrate(engine)
    repository = Repository(engine)
    lags: list[float] = []
    done = threading.Event()
    lock = threading.Lock()

    def callback(message: Any) -> None:
        try:
            repository.upsert_many([decode(message.data)])
        except Exception:
            message.nack()
            return
        message.ack()
        with lock:
            lags.append(time.time() - message.publish_time.timestamp())
            if len(lags) >= args.count:
                done.set()

    elapsed, cpu = _subscribe_and_wait(args.subscription, callback, args, done)
    p50, p99 = _percentiles(lags)
    return {"messages": len(lags), "seconds": elapsed, "cpu": cpu, "p50": p50, "p99": p99}


def child_pipeline(args: argparse.Namespace) -> dict[str, Any]:
    """Decode + upsert_many in the processor's batches, the same messages, no Pub/Sub."""
    from processor.config import ProcessorSettings
    from processor.storage import Repository, migrate, open_engine

    size = ProcessorSettings.model_fields["batch_size"].default

    bodies = [message.data for message in reference_messages(args.count)]
    repository = Repository(open_engine(args.database_url))
    migrate(repository.engine)
    started, cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(bodies), size):
        repository.upsert_many([decode(body) for body in bodies[start : start + size]])
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"messages": len(bodies), "seconds": elapsed, "cpu": cpu, "p50": 0.0, "p99": 0.0}


CHILDREN: dict[str, Any] = {
    "ack": child_ack_only,
    "batch-ack": child_batch_ack_only,
    "processor": child_processor,
    "processor-client": lambda args: child_processor(args, "client"),
    "common": child_common,
    "pipeline": child_pipeline,
}


def _child_command(variant: str, subscription: str, count: int, url: str, args: Any) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.e2e",
        "--child",
        variant,
        "--subscription",
        subscription,
        "--count",
        str(count),
        "--database-url",
        url,
        "--streams",
        str(args.streams),
        "--max-messages",
        str(args.max_messages),
    ]


def _result(stdout: str) -> dict[str, Any] | None:
    lines = [line for line in stdout.splitlines() if line.startswith('{"messages"')]
    return json.loads(lines[-1]) if lines else None


def run_child(
    variant: str, subscription: str, count: int, database_url: str, args: argparse.Namespace
) -> dict[str, Any]:
    command = _child_command(variant, subscription, count, database_url, args)
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, check=False)
    result = _result(done.stdout)
    if done.returncode != 0 or result is None:
        raise RuntimeError(f"{variant} failed: {done.stderr[-2000:]}")
    return result


def child_fleet_member(args: argparse.Namespace) -> dict[str, Any]:
    """A processor that runs until SIGTERM, writing how many messages it acked to a file."""
    from processor.commands.process import bootstrap
    from processor.runtime.logs import configure_logging
    from processor.runtime.metrics import Metrics
    from processor.stopping import stop_on_signals

    configure_logging("WARNING", "json")
    metrics = Metrics()
    lags = _Recorded(metrics.lag_seconds)
    metrics.lag_seconds = lags  # type: ignore[assignment]
    with stop_on_signals() as stop:
        processor = bootstrap(_settings(args, args.consumer), metrics)
        progress = Path(args.progress)
        started, cpu = time.perf_counter(), time.process_time()
        processor.start()
        while not stop.wait(0.05):
            progress.write_text(str(int(metrics.acked._value.get())))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    processor.shutdown(5)
    messages = int(metrics.acked._value.get())
    p50, p99 = _percentiles(lags.values) if lags.values else (0.0, 0.0)
    return {"messages": messages, "seconds": elapsed, "cpu": cpu, "p50": p50, "p99": p99}


def run_fleet(
    size: int, subscription: str, count: int, url: str, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """`size` processor processes on one subscription and database; total msg/s until `count`
    messages are acked, and what each process did."""
    files = [workdir / f"progress-{size}-{i}" for i in range(size)]
    for f in files:
        f.unlink(missing_ok=True)  # the previous database's run at this size left its count
    children = [
        subprocess.Popen(
            [*_child_command("fleet", subscription, count, url, args), "--progress", str(f)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for f in files
    ]

    def acked() -> list[int]:
        return [int(f.read_text() or 0) if f.exists() else 0 for f in files]

    # The clock starts once every process has opened its streams (its first progress write):
    # a fleet's rate is its drain rate, not its start-up, and what was acked before is left out.
    wait_until(lambda: all(f.exists() for f in files), timeout=120, interval=0.01)
    started, before = time.perf_counter(), acked()
    wait_until(lambda: sum(acked()) >= count, timeout=3600, interval=0.02)
    elapsed = time.perf_counter() - started
    results = []
    for child in children:
        child.terminate()
        stdout, _ = child.communicate(timeout=60)
        results.append(_result(stdout) or {"messages": 0, "cpu": 0.0, "rss_mb": 0.0})
    drained = [r["messages"] - b for r, b in zip(results, before, strict=True)]
    return {
        "processes": size,
        "rate": sum(drained) / elapsed,
        "per_process": [n / elapsed for n in drained],
        "cpu_us": sum(r["cpu"] for r in results) / sum(r["messages"] for r in results) * 1e6,
    }


CHILDREN["fleet"] = child_fleet_member
CLIENT_CHILDREN = frozenset({"ack", "common"})


def scaling(args: argparse.Namespace, console: Console, workdir: Path) -> None:
    table = Table(
        title=f"Scaling: processor processes (CONSUMER=batch, {args.streams} streams each) "
        f"draining {args.messages:,} messages into one database"
    )
    for column in ("database", "processes", "msg/s total", "msg/s per process", "CPU µs/msg"):
        table.add_column(column, justify="right")
    with emulator_process() as address:
        os.environ["PUBSUB_EMULATOR_HOST"] = address
        for name, base in (("sqlite", f"sqlite:///{workdir}/scale"), ("postgresql", args.postgres)):
            for size in (1, 2, 4):
                url = f"{base}-{size}.db" if name == "sqlite" else base
                if name == "postgresql":
                    _reset_postgres(url)
                subscription = preload(args.messages, f"scale-{name}-{size}")
                r = run_fleet(size, subscription, args.messages, url, args, workdir)
                per = " / ".join(f"{rate:,.0f}" for rate in r["per_process"])
                console.print(f"  {name} x{size}: {r['rate']:,.0f} msg/s ({per})")
                table.add_row(name, str(size), f"{r['rate']:,.0f}", per, f"{r['cpu_us']:.0f}")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--common-count", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2, help="each variant's best round counts")
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--max-messages", type=int, default=1000, help="flow control per stream")
    parser.add_argument("--callback-threads", type=int, default=1, help="per stream")
    parser.add_argument("--postgres", default=os.environ.get("TEST_DATABASE_URL", DEFAULT_POSTGRES))
    parser.add_argument("--scaling", action="store_true", help="1, 2 and 4 processor processes")
    parser.add_argument("--rows", default="a,e,b,c,f,d,p", help="which rows to measure")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--subscription", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    parser.add_argument("--progress", help=argparse.SUPPRESS)
    parser.add_argument("--consumer", default="batch", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        from processor.commands.process import tune_runtime

        # The processor's rows run as `process` does; the client's rows ((a), (d)) at the
        # client's own defaults, so (a) is the client at its best, not at our settings.
        if args.child not in CLIENT_CHILDREN:
            tune_runtime()
        result = CHILDREN[args.child](args)
        result["rss_mb"] = _peak_rss_mb()
        print(json.dumps(result), flush=True)
        os._exit(0)  # the client's threads need not be waited for

    console = Console(width=150)
    workdir = Path(tempfile.mkdtemp(prefix="mini-scan-e2e-"))
    if args.scaling:
        scaling(args, console, workdir)
        return 0
    sqlite = f"sqlite:///{workdir}"
    plan = [
        ("a", "client subscribe(), ack only (ceiling)", "ack", args.messages, ""),
        ("e", "batch consumer, ack only (ceiling)", "batch-ack", args.messages, ""),
        ("b", "processor, SQLite", "processor", args.messages, f"{sqlite}/b.db"),
        ("c", "processor, PostgreSQL", "processor", args.messages, args.postgres),
        (
            "f",
            "processor, SQLite, CONSUMER=client",
            "processor-client",
            args.messages,
            f"{sqlite}/f.db",
        ),
        ("d", "one txn + ack per message, SQLite", "common", args.common_count, f"{sqlite}/d.db"),
        (
            "p",
            "decode + upsert_many, no Pub/Sub, SQLite",
            "pipeline",
            args.messages,
            f"{sqlite}/p.db",
        ),
    ]
    plan = [row for row in plan if row[0] in args.rows.split(",")]
    results: dict[str, dict[str, Any]] = {}
    with emulator_process() as address:
        os.environ["PUBSUB_EMULATOR_HOST"] = address
        # Rounds interleave the variants, so a burst of load from elsewhere on the machine hits
        # them alike; each variant keeps its best round.
        for round_number in range(1, args.rounds + 1):
            for key, label, variant, count, url in plan:
                if url.startswith("sqlite"):
                    url = url.replace(".db", f"-{round_number}.db")  # every run starts empty
                elif url:
                    _reset_postgres(url)
                subscription = "" if variant == "pipeline" else preload(count, key)
                result = run_child(variant, subscription, count, url, args)
                result["rate"] = result["messages"] / result["seconds"]
                console.print(
                    f"  round {round_number} ({key}) {label}: {result['rate']:,.0f} msg/s"
                )
                if result["rate"] > results.get(key, {}).get("rate", 0):
                    results[key] = result

    table = Table(
        title=f"Draining {args.messages:,} preloaded messages, {args.streams} streams, "
        f"flow control {args.max_messages} per stream"
    )
    columns = (
        "",
        "consumer",
        "messages",
        "msg/s",
        "CPU µs/msg",
        "peak RSS MB",
        "lag p50 s",
        "lag p99 s",
    )
    for column in columns:
        table.add_column(column, justify="right")
    for key, label, *_ in plan:
        r = results[key]
        table.add_row(
            key,
            label,
            f"{r['messages']:,}",
            f"{r['rate']:,.0f}",
            f"{r['cpu'] / r['messages'] * 1e6:,.0f}",
            f"{r['rss_mb']:.0f}",
            f"{r['p50']:.2f}" if key != "p" else "",
            f"{r['p99']:.2f}" if key != "p" else "",
        )
    console.print(table)
    rate = {k: v["rate"] for k, v in results.items()}
    ratios = (
        ("b", "a", "x (target 2.5x)"),
        ("c", "a", "x (target 2.0x)"),
        ("b", "p", "x"),
        ("e", "a", "x"),
        ("f", "a", "x"),
        ("b", "d", "x"),
    )
    console.print(
        "   ".join(
            f"{top}/{bottom} = {rate[top] / rate[bottom]:.2f}{unit}"
            for top, bottom, unit in ratios
            if top in rate and bottom in rate
        )
    )
    return 0


def _peak_rss_mb() -> float:
    # VmHWM, not getrusage's ru_maxrss: that one survives exec, so a child would report the
    # parent's peak if it were larger.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_postgres(url: str) -> None:
    from processor.storage import open_engine
    from processor.storage.migrations import drop_schema

    engine = open_engine(url)
    drop_schema(engine)
    engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
