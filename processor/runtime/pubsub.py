"""Pub/Sub clients for every command: the same channel settings wherever a client is made, and
Pub/Sub's request limits for ack ids, split in one place."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
from google.cloud import pubsub_v1
from google.pubsub_v1.services.publisher.transports.grpc import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports.grpc import SubscriberGrpcTransport

MAX_IDS_PER_REQUEST = 2500  # Pub/Sub: ack ids in one Acknowledge or ModifyAckDeadline request
MAX_REQUEST_BYTES = 512 * 1024  # Pub/Sub: bytes in one such request

# gRPC keepalive, as the client library's production channel has it (a ping every 30 s), with
# the answer awaited 10 s: a connection that a NAT or load balancer dropped without FIN or RST
# is noticed and its streams fail over to a new connection. gRPC pings only once 30 s passed
# without reading anything, checked every 30 s, so that takes 40-70 s (measured: 59-62 s).
# Pings go on while no data flows (an idle stream), which gRPC otherwise stops after two.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def subscriber_client() -> pubsub_v1.SubscriberClient:
    """A subscriber that can receive any message Pub/Sub accepts (up to 10 MB), on a channel
    that notices a dead connection (`CHANNEL_OPTIONS`).

    Through PUBSUB_EMULATOR_HOST the client opens a plain channel with gRPC's default 4 MiB
    receive limit and no keepalive (its own production channel has neither problem): a bigger
    message would then break the stream on every delivery, and a silently dropped connection
    would never be noticed.
    """
    host = os.environ.get("PUBSUB_EMULATOR_HOST")
    if not host:
        return pubsub_v1.SubscriberClient()
    channel = grpc.insecure_channel(host, options=CHANNEL_OPTIONS)
    return pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))


def publisher_client(
    batch_settings: pubsub_v1.types.BatchSettings | None = None,
) -> pubsub_v1.PublisherClient:
    """A publisher on the same kind of channel as `subscriber_client()`."""
    settings = batch_settings or pubsub_v1.types.BatchSettings()
    host = os.environ.get("PUBSUB_EMULATOR_HOST")
    if not host:
        return pubsub_v1.PublisherClient(batch_settings=settings)
    channel = grpc.insecure_channel(host, options=CHANNEL_OPTIONS)
    return pubsub_v1.PublisherClient(
        batch_settings=settings, transport=PublisherGrpcTransport(channel=channel)
    )


def ack_id_chunks(ack_ids: list[str]) -> Iterator[list[str]]:
    """Ack ids in requests within Pub/Sub's limits: at most 2,500 ids and 512 KiB each (with
    room for the subscription name, and 3 bytes of framing an id). Sized by the longest id, so
    ids of one length (Pub/Sub's are) take as few requests as the limits allow."""
    if not ack_ids:
        return
    longest = max(map(len, ack_ids)) + 3
    size = max(1, min(MAX_IDS_PER_REQUEST, (MAX_REQUEST_BYTES - 4096) // longest))
    for start in range(0, len(ack_ids), size):
        yield ack_ids[start : start + size]
