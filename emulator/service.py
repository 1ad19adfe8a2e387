"""RPC bodies shared by the gRPC and REST fronts: request protobuf in, response protobuf out.

Failures are raised as EmulatorError; each front maps them to its own status codes.
"""

from __future__ import annotations

from typing import Any

from emulator import _pb, limits
from emulator.broker import Broker
from emulator.errors import InvalidArgument
from emulator.iam import IamPolicies

# Unary Pull long-polls this long for a first message before answering empty.
PULL_WAIT_SECONDS = 3.0


class Service:
    """One method per Pub/Sub RPC, named as the RPC (IAMPolicy's three included)."""

    def __init__(self, broker: Broker) -> None:
        self.b = broker
        self.iam = IamPolicies(broker)

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
        nbytes = r.ByteSize()
        limits.check_payload(nbytes)
        return _pb.PublishResponse(message_ids=self.b.publish(r.topic, list(r.messages), nbytes))

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

    def GetIamPolicy(self, r: Any) -> Any:
        return self.iam.GetIamPolicy(r)

    def SetIamPolicy(self, r: Any) -> Any:
        return self.iam.SetIamPolicy(r)

    def TestIamPermissions(self, r: Any) -> Any:
        return self.iam.TestIamPermissions(r)
