"""The gRPC face of the broker: Publisher and Subscriber services registered by method path."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from emulator import _pb
from emulator.broker import Broker
from emulator.errors import EmulatorError, InvalidArgument
from emulator.faults import Faults
from emulator.streaming import StreamRegistry, serve_stream

# Pub/Sub accepts 10 MB messages; a publish request carries framing on top.
MAX_REQUEST_BYTES = 20 * 1024 * 1024
PULL_WAIT_SECONDS = 3.0

_SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_send_message_length", MAX_REQUEST_BYTES),
    ("grpc.so_reuseport", 0),
    # The client pings every 30 s; the default policy would answer with GOAWAY (too_many_pings).
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # Our own pings notice a vanished peer whose socket never closed (e.g. a pulled cable).
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


class _Handlers:
    """RPC bodies: request protobuf in, response protobuf out, EmulatorError for failures."""

    def __init__(self, broker: Broker) -> None:
        self.b = broker

    def CreateTopic(self, r: Any) -> Any:
        return self.b.create_topic(r)

    def GetTopic(self, r: Any) -> Any:
        return self.b.get_topic(r.topic)

    def UpdateTopic(self, r: Any) -> Any:
        return self.b.update_topic(r.topic, list(r.update_mask.paths))

    def DeleteTopic(self, r: Any) -> Any:
        self.b.delete_topic(r.topic)
        return _pb.Empty()

    def ListTopics(self, r: Any) -> Any:
        topics, token = self.b.list_topics(r.project, r.page_size, r.page_token)
        return _pb.ListTopicsResponse(topics=topics, next_page_token=token)

    def ListTopicSubscriptions(self, r: Any) -> Any:
        subs, token = self.b.list_topic_subscriptions(r.topic, r.page_size, r.page_token)
        return _pb.ListTopicSubscriptionsResponse(subscriptions=subs, next_page_token=token)

    def Publish(self, r: Any) -> Any:
        return _pb.PublishResponse(message_ids=self.b.publish(r.topic, list(r.messages)))

    def CreateSubscription(self, r: Any) -> Any:
        return self.b.create_subscription(r)

    def GetSubscription(self, r: Any) -> Any:
        return self.b.get_subscription(r.subscription)

    def UpdateSubscription(self, r: Any) -> Any:
        return self.b.update_subscription(r.subscription, list(r.update_mask.paths))

    def DeleteSubscription(self, r: Any) -> Any:
        self.b.delete_subscription(r.subscription)
        return _pb.Empty()

    def ListSubscriptions(self, r: Any) -> Any:
        subs, token = self.b.list_subscriptions(r.project, r.page_size, r.page_token)
        return _pb.ListSubscriptionsResponse(subscriptions=subs, next_page_token=token)

    def Acknowledge(self, r: Any) -> Any:
        if not r.ack_ids:
            raise InvalidArgument("ack_ids must not be empty.")
        self.b.subscription(r.subscription).acknowledge(r.ack_ids)
        return _pb.Empty()

    def ModifyAckDeadline(self, r: Any) -> Any:
        if not 0 <= r.ack_deadline_seconds <= 600:
            raise InvalidArgument(
                "Invalid ack_deadline_seconds: must be between 0 and 600 seconds "
                f"(got {r.ack_deadline_seconds})."
            )
        self.b.subscription(r.subscription).modify_deadline(r.ack_ids, r.ack_deadline_seconds)
        return _pb.Empty()

    def Pull(self, r: Any) -> Any:
        if r.max_messages <= 0:
            raise InvalidArgument("max_messages must be a positive integer.")
        state = self.b.subscription(r.subscription)
        wait = 0.0 if r.return_immediately else PULL_WAIT_SECONDS
        batch = state.take(None, r.max_messages, wait) or []
        with_attempt = state.policy.max_attempts > 0
        resp = _pb.PullResponse()
        for ack_id, msg, attempt in batch:
            rm = resp.received_messages.add(ack_id=ack_id, message=msg)
            if with_attempt:
                rm.delivery_attempt = attempt
        return resp


_PUBLISHER = {
    "CreateTopic": (_pb.Topic, _pb.Topic),
    "UpdateTopic": (_pb.UpdateTopicRequest, _pb.Topic),
    "Publish": (_pb.PublishRequest, _pb.PublishResponse),
    "GetTopic": (_pb.GetTopicRequest, _pb.Topic),
    "ListTopics": (_pb.ListTopicsRequest, _pb.ListTopicsResponse),
    "ListTopicSubscriptions": (
        _pb.ListTopicSubscriptionsRequest, _pb.ListTopicSubscriptionsResponse,
    ),
    "DeleteTopic": (_pb.DeleteTopicRequest, _pb.Empty),
}
_SUBSCRIBER = {
    "CreateSubscription": (_pb.Subscription, _pb.Subscription),
    "GetSubscription": (_pb.GetSubscriptionRequest, _pb.Subscription),
    "UpdateSubscription": (_pb.UpdateSubscriptionRequest, _pb.Subscription),
    "ListSubscriptions": (_pb.ListSubscriptionsRequest, _pb.ListSubscriptionsResponse),
    "DeleteSubscription": (_pb.DeleteSubscriptionRequest, _pb.Empty),
    "ModifyAckDeadline": (_pb.ModifyAckDeadlineRequest, _pb.Empty),
    "Acknowledge": (_pb.AcknowledgeRequest, _pb.Empty),
    "Pull": (_pb.PullRequest, _pb.PullResponse),
}


def _serialize(msg: Any) -> bytes:
    return msg.SerializeToString()


def _apply_fault(faults: Faults, method: str, request: Any, context: grpc.ServicerContext) -> None:
    fault = faults.take(method, getattr(request, "topic", None) if method == "Publish" else None)
    if fault is None:
        return
    if fault.delay:
        time.sleep(fault.delay)  # the injected stall itself, not synchronisation
    if fault.code is not None:
        context.abort(fault.code, f"Injected fault for {method}.")


def _unary(faults: Faults, name: str, body: Callable[[Any], Any]) -> Callable[..., Any]:
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        _apply_fault(faults, name, request, context)
        try:
            return body(request)
        except EmulatorError as exc:
            context.abort(grpc.StatusCode[exc.code], str(exc))

    return handle


def _streaming(broker: Broker, faults: Faults, registry: StreamRegistry) -> Callable[..., Any]:
    def handle(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        _apply_fault(faults, "StreamingPull", None, context)
        return serve_stream(broker, registry, requests, context)

    return handle


def _unary_handlers(
    table: dict[str, tuple[Any, Any]], handlers: _Handlers, faults: Faults
) -> dict[str, grpc.RpcMethodHandler]:
    return {
        method: grpc.unary_unary_rpc_method_handler(
            _unary(faults, method, getattr(handlers, method)),
            request_deserializer=req.FromString,
            response_serializer=_serialize,
        )
        for method, (req, _resp) in table.items()
    }


def build_server(
    broker: Broker, faults: Faults, registry: StreamRegistry, executor: futures.Executor
) -> grpc.Server:
    """A grpc.Server serving google.pubsub.v1.Publisher and Subscriber (not yet bound/started)."""
    handlers = _Handlers(broker)
    server = grpc.server(executor, options=_SERVER_OPTIONS)
    subscriber = _unary_handlers(_SUBSCRIBER, handlers, faults)
    subscriber["StreamingPull"] = grpc.stream_stream_rpc_method_handler(
        _streaming(broker, faults, registry),
        request_deserializer=_pb.StreamingPullRequest.FromString,
        response_serializer=_serialize,
    )
    publisher = _unary_handlers(_PUBLISHER, handlers, faults)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler("google.pubsub.v1.Publisher", publisher),
            grpc.method_handlers_generic_handler("google.pubsub.v1.Subscriber", subscriber),
        )
    )
    return server
