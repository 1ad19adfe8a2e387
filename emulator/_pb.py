"""Raw protobuf classes of the Pub/Sub v1 API, taken from the proto-plus types the client ships.

The proto-plus wrappers are convenient but slow; `Type.pb()` hands back the underlying upb message
class, which is what the wire and the broker deal in.
"""

from __future__ import annotations

from google.protobuf import duration_pb2, empty_pb2, timestamp_pb2
from google.pubsub_v1.types import pubsub as _types

Empty = empty_pb2.Empty
Duration = duration_pb2.Duration
Timestamp = timestamp_pb2.Timestamp

Topic = _types.Topic.pb()
Subscription = _types.Subscription.pb()
PubsubMessage = _types.PubsubMessage.pb()
ReceivedMessage = _types.ReceivedMessage.pb()
DeadLetterPolicy = _types.DeadLetterPolicy.pb()
RetryPolicy = _types.RetryPolicy.pb()

GetTopicRequest = _types.GetTopicRequest.pb()
UpdateTopicRequest = _types.UpdateTopicRequest.pb()
DeleteTopicRequest = _types.DeleteTopicRequest.pb()
ListTopicsRequest = _types.ListTopicsRequest.pb()
ListTopicsResponse = _types.ListTopicsResponse.pb()
ListTopicSubscriptionsRequest = _types.ListTopicSubscriptionsRequest.pb()
ListTopicSubscriptionsResponse = _types.ListTopicSubscriptionsResponse.pb()
PublishRequest = _types.PublishRequest.pb()
PublishResponse = _types.PublishResponse.pb()

GetSubscriptionRequest = _types.GetSubscriptionRequest.pb()
UpdateSubscriptionRequest = _types.UpdateSubscriptionRequest.pb()
DeleteSubscriptionRequest = _types.DeleteSubscriptionRequest.pb()
ListSubscriptionsRequest = _types.ListSubscriptionsRequest.pb()
ListSubscriptionsResponse = _types.ListSubscriptionsResponse.pb()
PullRequest = _types.PullRequest.pb()
PullResponse = _types.PullResponse.pb()
AcknowledgeRequest = _types.AcknowledgeRequest.pb()
ModifyAckDeadlineRequest = _types.ModifyAckDeadlineRequest.pb()
StreamingPullRequest = _types.StreamingPullRequest.pb()
StreamingPullResponse = _types.StreamingPullResponse.pb()
