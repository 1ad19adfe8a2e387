"""The gRPC face of the broker: Publisher, Subscriber and IAMPolicy, registered by method path."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from google.iam.v1 import iam_policy_pb2

from emulator import _pb
from emulator.broker import Broker
from emulator.errors import EmulatorError
from emulator.faults import Faults
from emulator.service import Service
from emulator.streaming import StreamRegistry, serve_stream

# Pub/Sub accepts 10 MB messages; a publish request carries framing on top.
MAX_REQUEST_BYTES = 20 * 1024 * 1024

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


# RPC name -> request type; each RPC's body is the same-named method of `Service`.
_PUBLISHER = {
    "CreateTopic": _pb.Topic,
    "UpdateTopic": _pb.UpdateTopicRequest,
    "Publish": _pb.PublishRequest,
    "GetTopic": _pb.GetTopicRequest,
    "ListTopics": _pb.ListTopicsRequest,
    "ListTopicSubscriptions": _pb.ListTopicSubscriptionsRequest,
    "DeleteTopic": _pb.DeleteTopicRequest,
}
_SUBSCRIBER = {
    "CreateSubscription": _pb.Subscription,
    "GetSubscription": _pb.GetSubscriptionRequest,
    "UpdateSubscription": _pb.UpdateSubscriptionRequest,
    "ListSubscriptions": _pb.ListSubscriptionsRequest,
    "DeleteSubscription": _pb.DeleteSubscriptionRequest,
    "ModifyAckDeadline": _pb.ModifyAckDeadlineRequest,
    "Acknowledge": _pb.AcknowledgeRequest,
    "Pull": _pb.PullRequest,
}

# Pub/Sub's IAM is the separate google.iam.v1.IAMPolicy service on the same endpoint.
_IAM_POLICY = {
    "SetIamPolicy": iam_policy_pb2.SetIamPolicyRequest,
    "GetIamPolicy": iam_policy_pb2.GetIamPolicyRequest,
    "TestIamPermissions": iam_policy_pb2.TestIamPermissionsRequest,
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
        # Faults strike after the first request is read, as a real server failure would: failing
        # before it makes the client see the error twice (send and receive side) and reopen twice.
        epoch = faults.stream_epoch()
        return serve_stream(
            broker,
            registry,
            requests,
            context,
            on_first=lambda first: _apply_fault(faults, "StreamingPull", first, context),
            silenced=lambda: faults.silenced(epoch),
        )

    return handle


def _unary_handlers(
    table: dict[str, Any], handlers: Service, faults: Faults
) -> dict[str, grpc.RpcMethodHandler]:
    return {
        method: grpc.unary_unary_rpc_method_handler(
            _unary(faults, method, getattr(handlers, method)),
            request_deserializer=req.FromString,
            response_serializer=_serialize,
        )
        for method, req in table.items()
    }


def build_server(
    broker: Broker, faults: Faults, registry: StreamRegistry, executor: futures.Executor
) -> grpc.Server:
    """A grpc.Server serving google.pubsub.v1.Publisher and Subscriber (not yet bound/started)."""
    handlers = Service(broker)
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
            grpc.method_handlers_generic_handler(
                "google.iam.v1.IAMPolicy", _unary_handlers(_IAM_POLICY, handlers, faults)
            ),
        )
    )
    return server
