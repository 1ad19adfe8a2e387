"""Peak memory of one processor while hostile messages up to Pub/Sub's size limit arrive on
every stream at once, with good messages among them.

Our emulator runs in a process of its own, beside one `python -m processor` (the default
consumer; `--env CONSUMER=...` or any other `--env KEY=VALUE` reaches the processor) on SQLite,
or on a fresh PostgreSQL database with `--postgres`. For each shape in turn, a fresh processor
takes `--per-shape` hostile messages of that shape (default: STREAMS x 4), published at once
with `--good` good scans around them, until every one of them is acked (committed or
dead-lettered); its peak RSS (VmHWM) is then read, and it is stopped. Last, STREAMS messages of
every shape, all at once. Prints shape | messages | peak RSS MB | good stored | hostile stored |
dead-lettered by reason, after a first table of what `decode` alone costs for one message of
each shape (peak RSS above the message itself, CPU, outcome; each in a fresh process). Two
reference rows come first: the client alone (the processor's subscriber, same streams and flow
control) taking the wide arrays and acking them, then publishing a copy of each (as a dead
letter) and acking it once confirmed: the floor a consumer built on that client starts from.

    uv run python -m bench.hostile [--per-shape N] [--size 9990000] [--postgres [URL]]
                                   [--env KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from google.cloud import pubsub_v1
from rich.console import Console
from rich.table import Table

from bench.soak import (
    DEFAULT_POSTGRES,
    Child,
    create_database,
    create_resources,
    drop_database,
    metrics,
    spawn_processor,
    wait_ready,
)
from emulator.testing import emulator_process, wait_until
from processor.config import SetupSettings
from processor.storage import open_engine

MB = 1024 * 1024
# Under Pub/Sub's 10,000,000 bytes with room for the dead-letter attributes a rejected copy
# carries (reason, error, source ids: about 1.3 kB), which must fit the same limit.
DEFAULT_SIZE = 9_990_000
MEMORY_LIMIT_MB = 512  # the compose memory limit of a processor


def _message(ip: str, response: bytes, extra: bytes = b"null", version: int = 2) -> bytes:
    field = b"response_bytes_utf8" if version == 1 else b"response_str"
    head = b'{"ip":"%s","port":8,"service":"HTTP","timestamp":%d,"data_version":%d,' % (
        ip.encode(),
        int(time.time()),
        version,
    )
    return head + b'"data":{"%s":"%s"},"extra":%s}' % (field, response, extra)


def _fill(unit: bytes, room: int) -> bytes:
    return unit * (room // len(unit))


# Each shape: (ip, bytes of room) -> one message body of about that size. The first four are
# far beyond any scan message's structure; the others are valid scans with a huge response.
SHAPES: dict[str, Callable[[str, int], bytes]] = {
    "wide array of small numbers": lambda ip, n: _message(ip, b"x", b"[" + _fill(b"0,", n) + b"0]"),
    "deep nesting": lambda ip, n: _message(ip, b"x", _fill(b"[", n // 2) + _fill(b"]", n // 2)),
    "many keys": lambda ip, n: _message(
        ip, b"x", b"{" + b",".join(b'"%x":0' % i for i in range(n // 11)) + b"}"
    ),
    "many strings": lambda ip, n: _message(ip, b"x", b"[" + _fill(b'"",', n) + b'""]'),
    "one huge string, ASCII": lambda ip, n: _message(ip, _fill(b"a", n)),
    "one huge string, unknown field": lambda ip, n: _message(
        ip, b"x", b'"' + _fill(b"a", n) + b'"'
    ),
    "astral characters (raw UTF-8)": lambda ip, n: _message(ip, _fill("\U0001f600".encode(), n)),
    "ASCII and one astral (4 bytes a character)": lambda ip, n: _message(
        ip, "\U0001f600".encode() + _fill(b"a", n)
    ),
    "escapes \\u0000": lambda ip, n: _message(ip, _fill(b"\\u0000", n)),
    "escapes \\ud83d\\ude00": lambda ip, n: _message(ip, _fill(b"\\ud83d\\ude00", n)),
    "escaped quotes": lambda ip, n: _message(ip, _fill(b'\\"', n)),
    "v1 base64, ASCII and one astral": lambda ip, n: _message(
        ip,
        base64.b64encode("\U0001f600".encode() + _fill(b"a", n * 3 // 4 - 8)),
        version=1,
    ),
}


SHAPES_FIRST = next(iter(SHAPES))


def body(shape: str, ip: str, size: int) -> bytes:
    """A message of `shape` of at most `size` bytes."""
    room = size - len(SHAPES[shape](ip, 0)) - 16
    raw = SHAPES[shape](ip, room)
    assert len(raw) <= size, (shape, len(raw))
    return raw


def good_scan(phase: int, i: int) -> bytes:
    scan = {"ip": f"10.{phase}.{i // 256}.{i % 256}", "port": 443, "service": "HTTP"}
    scan |= {"timestamp": int(time.time()), "data_version": 2}
    return json.dumps(scan | {"data": {"response_str": f"good {i}"}}).encode()


def peak_rss_mb(pid: int | str, field: str = "VmHWM") -> float:
    """Peak RSS (or with field="VmRSS", current RSS) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def decode_alone(shape: str, size: int) -> dict[str, object]:
    """In this (fresh) process: the peak RSS that decoding one message of `shape` adds."""
    from processor.schema import Rejection, decode

    raw = body(shape, "10.0.0.1", size)
    Path("/proc/self/clear_refs").write_text("5")  # the peak so far was building the message
    before = peak_rss_mb("self", "VmRSS")
    cpu = time.process_time()
    try:
        outcome = f"{len(decode(raw).response):,} characters"
    except Rejection as rejection:
        outcome = str(rejection.reason)
    cpu = time.process_time() - cpu
    return {"added_mb": peak_rss_mb("self") - before, "cpu_ms": cpu * 1000, "outcome": outcome}


def decoder_table(console: Console, shapes: list[str], size: int) -> None:
    table = Table(title=f"decode alone, one message of {size:,} bytes, a fresh process each")
    for column in ("shape", "peak RSS added MB", "CPU ms", "outcome"):
        table.add_column(column, justify="left" if column in ("shape", "outcome") else "right")
    for shape in shapes:
        command = [sys.executable, "-m", "bench.hostile", "--decode-child", shape]
        result = subprocess.run(
            [*command, "--size", str(size)], capture_output=True, text=True, check=True
        )
        row = json.loads(result.stdout.splitlines()[-1])
        table.add_row(shape, f"{row['added_mb']:.0f}", f"{row['cpu_ms']:.0f}", row["outcome"])
    console.print(table)


FLOORS = {"client floor: ack only": "ack", "client floor: publish a copy, then ack": "copy"}


def floor_child(args: argparse.Namespace) -> dict[str, object]:
    """In this (fresh) process: the client alone takes `--count` messages; its peak RSS."""
    from processor.config import ProcessorSettings
    from processor.runtime.pubsub import subscriber_client

    settings = ProcessorSettings()
    publisher = pubsub_v1.PublisherClient()
    acked: list[int] = []

    def callback(message: pubsub_v1.subscriber.message.Message) -> None:
        if args.floor_child == "ack":
            message.ack()
            acked.append(1)
            return
        future = publisher.publish(settings.dead_letter_topic_path, message.data, reason="x")
        future.add_done_callback(lambda _: (message.ack(), acked.append(1)))

    flow = pubsub_v1.types.FlowControl(
        max_messages=settings.max_messages, max_bytes=settings.max_bytes
    )
    client = subscriber_client()
    for _ in range(settings.streams):
        client.subscribe(settings.subscription_path, callback, flow_control=flow)
    done = wait_until(lambda: len(acked) >= args.count, timeout=args.timeout, interval=0.05)
    return {"peak": peak_rss_mb("self"), "done": done}


def run_floor(
    label: str, names: dict[str, str], bodies: list[bytes], args: argparse.Namespace
) -> dict[str, object]:
    publisher = pubsub_v1.PublisherClient()
    topic = f"projects/{SetupSettings().project}/topics/{names['pubsub_topic']}"
    for future in [publisher.publish(topic, data) for data in bodies]:
        future.result(timeout=120)
    started = time.monotonic()
    command = [sys.executable, "-m", "bench.hostile", "--floor-child", FLOORS[label]]
    command += ["--count", str(len(bodies)), "--timeout", str(args.timeout)]
    env = os.environ | {k.upper(): v for k, v in names.items()}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    row = json.loads(result.stdout.splitlines()[-1])
    return {
        "shape": label,
        "messages": f"{len(bodies)} wide arrays",
        "idle": float("nan"),
        "peak": row["peak"],
        "good": "-",
        "stored": "-",
        "dead": "-",
        "seconds": time.monotonic() - started,
        "done": row["done"],
    }


def run_phase(
    label: str,
    bodies: list[bytes],
    phase: int,
    args: argparse.Namespace,
    publisher: pubsub_v1.PublisherClient,
    topic: str,
    child: Child,
    engine: sa.Engine,
) -> dict[str, object]:
    """Publish hostile bodies with good scans around them; wait until all are acked."""
    goods = [good_scan(phase, i) for i in range(args.good)]
    slices = [goods[i :: len(bodies) + 1] for i in range(len(bodies) + 1)]
    started = time.monotonic()
    futures = []
    for hostile, good in zip([*bodies, b""], slices, strict=True):
        futures += [publisher.publish(topic, data) for data in good]
        if hostile:
            futures.append(publisher.publish(topic, hostile))
    for future in futures:
        future.result(timeout=120)
    total = len(bodies) + len(goods)

    def acked() -> float:
        return metrics(child.metrics_port).get("mini_scan_messages_acked_total", 0.0)

    done = wait_until(
        lambda: acked() >= total or child.process.poll() is not None,
        timeout=args.timeout,
        interval=0.2,
    )
    seconds = time.monotonic() - started
    alive = child.process.poll() is None
    after = metrics(child.metrics_port) if alive else {}
    prefix = 'mini_scan_messages_dead_lettered_total{reason="'
    dead = {
        name[len(prefix) : -2]: int(value)
        for name, value in after.items()
        if name.startswith(prefix) and value
    }
    with engine.connect() as connection:
        good_rows = connection.execute(
            sa.text("SELECT count(*) FROM services WHERE port = 443 AND ip LIKE :prefix"),
            {"prefix": f"10.{phase}.%"},
        ).scalar_one()
        hostile_rows = connection.execute(
            sa.text("SELECT count(*) FROM services WHERE port = 8 AND ip LIKE :prefix"),
            {"prefix": f"10.200.{phase}.%"},
        ).scalar_one()
    return {
        "shape": label,
        "messages": f"{len(bodies)} + {len(goods)} good",
        "peak": peak_rss_mb(child.process.pid) if alive else float("nan"),
        "good": f"{good_rows}/{len(goods)}",
        "stored": f"{hostile_rows}/{len(bodies)}",
        "dead": ", ".join(f"{reason} {count}" for reason, count in sorted(dead.items())) or "-",
        "seconds": seconds,
        "done": done and alive and good_rows == len(goods),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-shape", type=int, help="hostile messages a shape (STREAMS x 4)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="bytes a message")
    parser.add_argument("--good", type=int, default=400, help="good scans a phase")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a phase may take")
    parser.add_argument(
        "--postgres",
        nargs="?",
        const=DEFAULT_POSTGRES,
        help="a fresh database on this PostgreSQL server (default: SQLite in a temporary dir)",
    )
    parser.add_argument("--shapes", help="comma-separated shape numbers (1-based); default all")
    parser.add_argument("--decode-child", choices=list(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--floor-child", choices=list(FLOORS.values()), help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed to the processor's environment (e.g. CONSUMER=batch, MAX_BYTES=...)",
    )
    args = parser.parse_args(argv)
    if args.decode_child:
        print(json.dumps(decode_alone(args.decode_child, args.size)))
        return 0
    if args.floor_child:
        print(json.dumps(floor_child(args)), flush=True)
        os._exit(0)  # the client's threads need not be waited for
    extra_env = dict(pair.split("=", 1) for pair in args.env)
    streams = int(extra_env.get("STREAMS", os.environ.get("STREAMS", "2")))
    per_shape = args.per_shape or streams * 4
    shapes = list(SHAPES)
    if args.shapes:
        shapes = [shapes[int(n) - 1] for n in args.shapes.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="mini-scan-hostile-"))
    url, admin = f"sqlite:///{workdir / 'hostile.db'}", None
    if args.postgres:
        url, admin = create_database(args.postgres)
    console = Console(width=180)
    decoder_table(console, shapes, args.size)
    try:
        with emulator_process() as address:
            os.environ["PUBSUB_EMULATOR_HOST"] = address
            return measure(args, shapes, per_shape, streams, extra_env, url, workdir, console)
    finally:
        if admin is not None:
            drop_database(admin, url)
        for database in workdir.glob("hostile.db*"):  # hundreds of MB of stored responses
            database.unlink()


def measure(
    args: argparse.Namespace,
    shapes: list[str],
    per_shape: int,
    streams: int,
    extra_env: dict[str, str],
    url: str,
    workdir: Path,
    console: Console,
) -> int:
    names = create_resources("hostile")
    os.environ.update(extra_env)  # spawn_processor passes this process's environment on
    engine = open_engine(url)
    publisher = pubsub_v1.PublisherClient()
    topic = f"projects/{SetupSettings().project}/topics/{names['pubsub_topic']}"
    env_text = " ".join(f"{k}={v}" for k, v in extra_env.items()) or "defaults"
    console.print(
        f"a fresh processor a shape ({env_text}), {streams} streams, {per_shape} hostile messages"
        f" of {args.size:,} bytes a shape, {args.good} good scans a phase; logs in {workdir}"
    )
    rows, codes = [], []
    for label in FLOORS:
        wide = [body(SHAPES_FIRST, f"10.201.0.{i}", args.size) for i in range(per_shape)]
        rows.append(run_floor(label, names, wide, args))
        console.print(f"  {label}: peak {rows[-1]['peak']:.0f} MB")
    phases = [(shape, [shape] * per_shape) for shape in shapes]
    phases.append((f"all {len(shapes)} shapes at once, {streams} of each", shapes * streams))
    for phase, (label, kinds) in enumerate(phases, start=1):
        child = spawn_processor(f"processor-{phase}", names, url, workdir)
        wait_ready(child)
        idle = child.sample_rss()
        bodies = [body(kind, f"10.200.{phase}.{i}", args.size) for i, kind in enumerate(kinds)]
        row = run_phase(label, bodies, phase, args, publisher, topic, child, engine)
        del bodies
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
        codes.append(child.process.wait(timeout=60))
        rows.append(row | {"idle": idle})
        console.print(
            f"  {label}: idle {idle:.0f} MB, peak {row['peak']:.0f} MB, good {row['good']}, "
            f"stored {row['stored']}, dead-lettered {row['dead']}, {row['seconds']:.1f} s, "
            f"exit {codes[-1]}"
        )
    engine.dispose()
    report(console, rows)
    processors = rows[len(FLOORS) :]
    worst = max(float(row["peak"]) for row in processors)  # type: ignore[arg-type]
    complete = all(row["done"] for row in rows)
    console.print(
        f"worst processor peak RSS {worst:.0f} MB (limit {MEMORY_LIMIT_MB} MB); every phase "
        f"complete with its good scans stored: {complete}; exit codes {sorted(set(codes))}; "
        "load average " + " ".join(Path("/proc/loadavg").read_text().split()[:3])
    )
    return 0 if complete and set(codes) == {0} and worst <= MEMORY_LIMIT_MB else 1


def report(console: Console, rows: list[dict[str, object]]) -> None:
    table = Table(title="A processor under hostile messages")
    columns = (
        "shape",
        "messages",
        "idle RSS MB",
        "peak RSS MB",
        "good stored",
        "hostile stored",
        "dead-lettered by reason",
        "s",
    )
    for column in columns:
        table.add_column(
            column, justify="left" if column.startswith(("shape", "dead")) else "right"
        )
    for row in rows:
        table.add_row(
            str(row["shape"]),
            str(row["messages"]),
            "-" if row["idle"] != row["idle"] else f"{row['idle']:.0f}",
            f"{row['peak']:.0f}",
            str(row["good"]),
            str(row["stored"]),
            str(row["dead"]),
            f"{row['seconds']:.1f}",
        )
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
