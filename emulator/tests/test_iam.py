"""IAM policies on topics and subscriptions, through the real client's get/set/test_iam_* calls:
stored with etags (a stale etag is ABORTED), never enforced, NOT_FOUND for a missing resource."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from google.api_core import exceptions
from google.iam.v1 import policy_pb2

from emulator.tests.helpers import unique

# What the service answers for a resource that never had a policy: etag "ACAB" in base64.
EMPTY_ETAG = b"\x00\x20\x01"
VIEWER = policy_pb2.Binding(role="roles/pubsub.viewer", members=["user:ana@example.com"])
EDITOR = policy_pb2.Binding(role="roles/pubsub.editor", members=["group:ops@example.com"])


def set_policy(client: Any, name: str, *bindings: Any, etag: bytes = b"") -> Any:
    policy = policy_pb2.Policy(bindings=bindings, etag=etag)
    return client.set_iam_policy(request={"resource": name, "policy": policy})


@pytest.fixture(params=["topic", "subscription"])
def resource(request, publisher, subscriber, topic, make_subscription) -> tuple[Any, str]:
    """(client, resource name): each test runs on a topic and on a subscription."""
    if request.param == "topic":
        return publisher, topic
    return subscriber, make_subscription()


def test_a_resource_without_a_policy_has_an_empty_one_with_the_service_etag(resource):
    client, name = resource

    policy = client.get_iam_policy(request={"resource": name})

    assert list(policy.bindings) == []
    assert policy.etag == EMPTY_ETAG


def test_a_policy_that_was_set_is_returned_with_a_new_etag(resource):
    client, name = resource

    stored = set_policy(client, name, VIEWER)
    fetched = client.get_iam_policy(request={"resource": name})

    assert list(fetched.bindings) == [VIEWER]
    assert fetched.etag == stored.etag
    assert fetched.etag not in (b"", EMPTY_ETAG)


def test_a_read_modify_write_with_a_stale_etag_is_aborted_and_changes_nothing(resource):
    client, name = resource
    first = client.get_iam_policy(request={"resource": name})
    set_policy(client, name, VIEWER, etag=first.etag)

    with pytest.raises(exceptions.Aborted) as aborted:
        set_policy(client, name, EDITOR, etag=first.etag)

    assert "concurrent policy changes" in aborted.value.message
    assert list(client.get_iam_policy(request={"resource": name}).bindings) == [VIEWER]


def test_a_read_modify_write_with_the_current_etag_succeeds(resource):
    client, name = resource
    set_policy(client, name, VIEWER)
    current = client.get_iam_policy(request={"resource": name})

    current.bindings.append(EDITOR)
    client.set_iam_policy(request={"resource": name, "policy": current})

    assert list(client.get_iam_policy(request={"resource": name}).bindings) == [VIEWER, EDITOR]


def test_test_iam_permissions_grants_whatever_is_asked_as_policies_are_not_enforced(resource):
    client, name = resource
    asked = ["pubsub.topics.publish", "pubsub.subscriptions.consume", "pubsub.topics.delete"]

    granted = client.test_iam_permissions(request={"resource": name, "permissions": asked})

    assert list(granted.permissions) == asked


@pytest.mark.parametrize("kind", ["topics", "subscriptions"])
def test_every_iam_call_on_a_missing_resource_is_not_found(publisher, kind):
    name = unique(kind)
    calls = [
        lambda: publisher.get_iam_policy(request={"resource": name}),
        lambda: set_policy(publisher, name, VIEWER),
        lambda: publisher.test_iam_permissions(
            request={"resource": name, "permissions": ["pubsub.topics.get"]}
        ),
    ]
    for call in calls:
        with pytest.raises(exceptions.NotFound):
            call()


def test_a_malformed_resource_name_is_an_invalid_argument(publisher):
    with pytest.raises(exceptions.InvalidArgument):
        publisher.get_iam_policy(request={"resource": "projects/p/buckets/b"})


def test_a_deleted_and_recreated_topic_starts_without_a_policy(publisher, topic):
    set_policy(publisher, topic, VIEWER)

    publisher.delete_topic(topic=topic)
    publisher.create_topic(name=topic)

    assert publisher.get_iam_policy(request={"resource": topic}).etag == EMPTY_ETAG


def test_rest_get_set_and_test_iam_policy_round_trip(rest, topic):
    empty = rest("GET", f"{topic}:getIamPolicy")
    policy = {"bindings": [{"role": "roles/pubsub.viewer", "members": ["user:ana@example.com"]}]}
    stored = rest("POST", f"{topic}:setIamPolicy", {"policy": policy})
    stale = rest("POST", f"{topic}:setIamPolicy", {"policy": {**policy, "etag": empty[1]["etag"]}})
    tested = rest("POST", f"{topic}:testIamPermissions", {"permissions": ["pubsub.topics.get"]})

    assert empty == (200, {"etag": base64.b64encode(EMPTY_ETAG).decode()})
    assert stored[0] == 200
    assert stored[1]["bindings"] == policy["bindings"]
    assert stale[0] == 409
    assert stale[1]["error"]["status"] == "ABORTED"
    assert tested == (200, {"permissions": ["pubsub.topics.get"]})
