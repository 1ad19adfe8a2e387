"""Pub/Sub clients for every command: the same channel settings wherever a client is made."""

from __future__ import annotations

import os

import grpc
from google.cloud import pubsub_v1
from google.pubsub_v1.services.subscriber.transports.grpc import SubscriberGrpcTransport


def subscriber_client() -> pubsub_v1.SubscriberClient:
    """A subscriber that can receive any message Pub/Sub accepts (up to 10 MB).

    Through PUBSUB_EMULATOR_HOST the client opens a plain channel with gRPC's default 4 MiB
    receive limit (its own production channel has none): a bigger message would then break the
    stream on every delivery, never be processed, and stall the messages sent behind it.
    """
    host = os.environ.get("PUBSUB_EMULATOR_HOST")
    if not host:
        return pubsub_v1.SubscriberClient()
    channel = grpc.insecure_channel(host, options=[("grpc.max_receive_message_length", -1)])
    return pubsub_v1.SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))
