"""Drain rate of a real google-cloud-pubsub subscriber against our emulator and Google's.

Preloads a subscription (raw gRPC Publish in batches, so preloading is quick), then times how fast
a SubscriberClient that only acks drains it, with 1, 4 and 8 StreamingPulls on one client. The
emulators run in their own processes so they do not share the subscriber's GIL.

    uv run python -m bench.emulator [--messages 100000] [--streams 1,4,8] [--no-official]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's directory comes first on sys.path and its name would shadow the
# `emulator` package; put the repository root there instead.
if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse
import contextlib
import json
import multiprocessing
import os
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
from google.cloud import pubsub_v1

from emulator import _pb
from emulator.testing import (
    OfficialEmulatorUnavailable,
    emulator_process,
    official_emulator,
    wait_until,
)

PROJECT = "bench"


def preload(address: str, topic: str, subscription: str, count: int, payload: int) -> None:
    with grpc.insecure_channel(
        address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    ) as channel:

        def call(method: str, req_type: type, resp_type: type):
            return channel.unary_unary(
                method,
                request_serializer=req_type.SerializeToString,
                response_deserializer=resp_type.FromString,
            )

        call("/google.pubsub.v1.Publisher/CreateTopic", _pb.Topic, _pb.Topic)(_pb.Topic(name=topic))
        call("/google.pubsub.v1.Subscriber/CreateSubscription", _pb.Subscription, _pb.Subscription)(
            _pb.Subscription(name=subscription, topic=topic, ack_deadline_seconds=60)
        )
        publish = call(
            "/google.pubsub.v1.Publisher/Publish", _pb.PublishRequest, _pb.PublishResponse
        )
        for start in range(0, count, 1000):
            ids = range(start, min(count, start + 1000))
            batch = [_pb.PubsubMessage(data=_payload(i, payload)) for i in ids]
            publish(_pb.PublishRequest(topic=topic, messages=batch), timeout=60)


def _payload(i: int, size: int) -> bytes:
    body = {"ip": f"10.0.{i // 256 % 256}.{i % 256}", "port": 443, "service": "HTTP", "seq": i}
    raw = json.dumps(body).encode()
    return raw + b" " * max(0, size - len(raw))


def drain(address: str, subscription: str, count: int, streams: int, max_messages: int) -> float:
    """Seconds until `count` distinct messages were received and acked."""
    os.environ["PUBSUB_EMULATOR_HOST"] = address
    seen: set[str] = set()
    done = threading.Event()

    def callback(message: pubsub_v1.subscriber.message.Message) -> None:
        message.ack()
        seen.add(message.message_id)
        if len(seen) >= count:
            done.set()

    subscriber = pubsub_v1.SubscriberClient()
    flow = pubsub_v1.types.FlowControl(max_messages=max_messages)
    start = time.perf_counter()
    futures = [
        subscriber.subscribe(subscription, callback, flow_control=flow) for _ in range(streams)
    ]
    finished = done.wait(timeout=max(120.0, count / 200))
    elapsed = time.perf_counter() - start
    for f in futures:
        f.cancel()
    for f in futures:
        with contextlib.suppress(Exception):
            f.result(timeout=30)
    subscriber.close()
    if not finished:
        raise RuntimeError(f"drained only {len(seen)} of {count} messages")
    return elapsed


def _drain_child(
    address: str,
    subscription: str,
    streams: int,
    max_messages: int,
    acked: Any,
    ready: Any,
    go: Any,
    stop: Any,
) -> None:
    """One subscriber process of `drain_processes`: acks, adding its count to `acked`."""
    os.environ["PUBSUB_EMULATOR_HOST"] = address
    local = [0]
    lock = threading.Lock()

    def callback(message: pubsub_v1.subscriber.message.Message) -> None:
        message.ack()
        with lock:
            local[0] += 1

    subscriber = pubsub_v1.SubscriberClient()
    flow = pubsub_v1.types.FlowControl(max_messages=max_messages)
    ready.release()
    go.wait()
    futures = [
        subscriber.subscribe(subscription, callback, flow_control=flow) for _ in range(streams)
    ]
    reported = 0
    while not stop.wait(0.02):
        with lock:
            count = local[0]
        with acked.get_lock():
            acked.value += count - reported
        reported = count
    for f in futures:
        f.cancel()


def drain_processes(
    address: str,
    subscription: str,
    count: int,
    streams: int,
    max_messages: int,
    processes: int = 2,
) -> float:
    """Like `drain`, with the streams spread over `processes` subscriber processes: one Python
    client process is capped by its own CPU (about 120 us a message), not by the server."""
    context = multiprocessing.get_context("spawn")
    acked = context.Value("q", 0)
    ready, go, stop = context.Semaphore(0), context.Event(), context.Event()
    shares = [streams // processes + (i < streams % processes) for i in range(processes)]
    children = [
        context.Process(
            target=_drain_child,
            args=(address, subscription, share, max_messages, acked, ready, go, stop),
        )
        for share in shares
        if share
    ]
    for child in children:
        child.start()
    for _ in children:
        ready.acquire()  # imports done, clients built: time only the draining
    start = time.perf_counter()
    go.set()
    finished = wait_until(
        lambda: acked.value >= count, timeout=max(120.0, count / 200), interval=0.005
    )
    elapsed = time.perf_counter() - start
    stop.set()
    for child in children:
        child.join(timeout=30)
    if not finished:
        raise RuntimeError(f"drained only {acked.value} of {count} messages")
    return elapsed


def drain_raw(
    address: str, subscription: str, count: int, streams: int, max_messages: int
) -> float:
    """Like `drain`, with a minimal raw-gRPC consumer acking on the stream: the broker's ceiling."""
    seen: set[str] = set()
    lock, done = threading.Lock(), threading.Event()
    channel = grpc.insecure_channel(address)
    pull = channel.stream_stream(
        "/google.pubsub.v1.Subscriber/StreamingPull",
        request_serializer=_pb.StreamingPullRequest.SerializeToString,
        response_deserializer=_pb.StreamingPullResponse.FromString,
    )

    def consume() -> None:
        acks: queue.SimpleQueue[list[str] | None] = queue.SimpleQueue()

        def requests() -> Iterator[object]:
            yield _pb.StreamingPullRequest(
                subscription=subscription,
                stream_ack_deadline_seconds=60,
                max_outstanding_messages=max_messages,
            )
            while (ack_ids := acks.get()) is not None:
                yield _pb.StreamingPullRequest(ack_ids=ack_ids)

        call = pull(requests())
        with contextlib.suppress(grpc.RpcError):
            for response in call:
                ids = [m.message.message_id for m in response.received_messages]
                acks.put([m.ack_id for m in response.received_messages])
                with lock:
                    seen.update(ids)
                    if len(seen) >= count:
                        done.set()
                if done.is_set():
                    break
        acks.put(None)
        call.cancel()

    start = time.perf_counter()
    threads = [threading.Thread(target=consume, name=f"raw-{i}") for i in range(streams)]
    for t in threads:
        t.start()
    finished = done.wait(timeout=120)
    elapsed = time.perf_counter() - start
    channel.close()
    for t in threads:
        t.join(timeout=10)
    if not finished:
        raise RuntimeError(f"drained only {len(seen)} of {count} messages")
    return elapsed


def measure(address: str, args: argparse.Namespace) -> dict[str, dict[int, float]]:
    """Drain rates per stream count: "client" (google-cloud-pubsub) and "raw" (minimal gRPC)."""
    drains: dict[str, Any] = {"client": drain, "client2": drain_processes}
    if not args.no_raw:
        drains["raw"] = drain_raw
    rates: dict[str, dict[int, float]] = {kind: {} for kind in drains}
    for kind, drain_fn in drains.items():
        for streams in args.streams:
            run = uuid.uuid4().hex[:8]
            topic = f"projects/{PROJECT}/topics/t-{run}"
            subscription = f"projects/{PROJECT}/subscriptions/s-{run}"
            preload(address, topic, subscription, args.messages, args.payload)
            seconds = drain_fn(address, subscription, args.messages, streams, args.max_messages)
            rates[kind][streams] = args.messages / seconds
            print(
                f"  {kind} {streams} stream(s): {rates[kind][streams]:,.0f} msg/s",
                file=sys.stderr,
                flush=True,
            )
    return rates


def _cell(rate: float | None, width: int) -> str:
    return f"{rate:>{width},.0f}" if rate else f"{'n/a':>{width}}"


def print_table(
    args: argparse.Namespace, mine: dict[str, dict[int, float]], theirs: dict[str, dict[int, float]]
) -> None:
    print(
        f"\n{args.messages:,} messages of {args.payload} B, "
        f"flow control {args.max_messages} per stream; msg/s"
    )
    print(
        "streams | ours (client) | official (client) | ratio | ours (client, 2 processes) "
        "| official (client, 2 processes) | ratio | ours (raw gRPC) | official (raw)"
    )
    print(
        "--------+---------------+-------------------+-------+----------------------------"
        "+--------------------------------+-------+-----------------+---------------"
    )
    for streams in args.streams:
        cells = []
        for kind, width in (("client", 13), ("client2", 26)):
            ours, other = mine[kind][streams], theirs.get(kind, {}).get(streams)
            ratio = f"{ours / other:>5.1f}" if other else f"{'n/a':>5}"
            cells.append(f"{_cell(ours, width)} | {_cell(other, width + 4)} | {ratio}")
        print(
            f"{streams:>7} | {cells[0]} | {cells[1]} | "
            f"{_cell(mine.get('raw', {}).get(streams), 15)} | "
            f"{_cell(theirs.get('raw', {}).get(streams), 14)}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--payload", type=int, default=200, help="bytes per message")
    parser.add_argument("--streams", default="1,4,8", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--max-messages", type=int, default=5000, help="flow control per stream")
    parser.add_argument("--no-official", action="store_true", help="skip Google's emulator")
    parser.add_argument("--no-raw", action="store_true", help="skip the raw-gRPC ceiling runs")
    args = parser.parse_args(argv)

    print("ours:", file=sys.stderr)
    with emulator_process() as address:
        mine = measure(address, args)
    theirs: dict[str, dict[int, float]] = {}
    if not args.no_official:
        try:
            with official_emulator() as address:
                wait_until(lambda: _ready(address), timeout=30)
                print("official:", file=sys.stderr)
                theirs = measure(address, args)
        except OfficialEmulatorUnavailable as exc:
            print(f"official emulator skipped: {exc}", file=sys.stderr)
    print_table(args, mine, theirs)
    return 0


def _ready(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=1)
        except grpc.FutureTimeoutError:
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
