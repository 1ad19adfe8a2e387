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
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import grpc
from google.cloud import pubsub_v1

from emulator import _pb
from emulator.testing import OfficialEmulatorUnavailable, free_port, official_emulator, wait_until

PROJECT = "bench"


@contextlib.contextmanager
def ours() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=30)
        channel.close()
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def preload(address: str, topic: str, subscription: str, count: int, payload: int) -> None:
    with grpc.insecure_channel(
        address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    ) as channel:
        def call(method: str, req_type: type, resp_type: type):
            return channel.unary_unary(
                method, request_serializer=req_type.SerializeToString,
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


def measure(address: str, args: argparse.Namespace) -> dict[int, float]:
    rates = {}
    for streams in args.streams:
        run = uuid.uuid4().hex[:8]
        topic = f"projects/{PROJECT}/topics/t-{run}"
        subscription = f"projects/{PROJECT}/subscriptions/s-{run}"
        preload(address, topic, subscription, args.messages, args.payload)
        seconds = drain(address, subscription, args.messages, streams, args.max_messages)
        rates[streams] = args.messages / seconds
        print(f"  {streams} stream(s): {rates[streams]:,.0f} msg/s", file=sys.stderr, flush=True)
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--payload", type=int, default=200, help="bytes per message")
    parser.add_argument("--streams", default="1,4,8", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--max-messages", type=int, default=5000, help="flow control per stream")
    parser.add_argument("--no-official", action="store_true", help="skip Google's emulator")
    args = parser.parse_args(argv)

    print("ours:", file=sys.stderr)
    with ours() as address:
        mine = measure(address, args)
    theirs: dict[int, float] = {}
    if not args.no_official:
        try:
            with official_emulator() as address:
                wait_until(lambda: _ready(address), timeout=30)
                print("official:", file=sys.stderr)
                theirs = measure(address, args)
        except OfficialEmulatorUnavailable as exc:
            print(f"official emulator skipped: {exc}", file=sys.stderr)

    print(f"\n{args.messages:,} messages of {args.payload} B, "
          f"flow control {args.max_messages} per stream")
    print(f"{'streams':>7} | {'ours msg/s':>10} | {'official msg/s':>14} | {'ratio':>5}")
    print(f"{'-' * 7}-+-{'-' * 10}-+-{'-' * 14}-+-{'-' * 5}")
    for streams, rate in mine.items():
        other = theirs.get(streams)
        official = f"{other:>14,.0f}" if other else f"{'n/a':>14}"
        ratio = f"{rate / other:>5.1f}" if other else f"{'n/a':>5}"
        print(f"{streams:>7} | {rate:>10,.0f} | {official} | {ratio}")
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
