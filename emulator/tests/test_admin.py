"""Topic and subscription administration: echoes, defaults, paging and the service's error codes."""

from __future__ import annotations

import pytest
from google.api_core import exceptions
from google.protobuf import field_mask_pb2

from emulator.tests.helpers import PROJECT, unique


def test_a_created_subscription_echoes_its_settings_with_the_service_defaults(subscriber, topic):
    name = unique("subscriptions")
    created = subscriber.create_subscription(
        request={
            "name": name,
            "topic": topic,
            "labels": {"team": "scan"},
            "enable_message_ordering": True,
        }
    )

    fetched = subscriber.get_subscription(subscription=name)

    assert fetched == created
    assert fetched.ack_deadline_seconds == 10
    assert fetched.message_retention_duration.total_seconds() == 7 * 86400
    assert fetched.labels == {"team": "scan"}
    assert fetched.enable_message_ordering is True


def test_dead_letter_and_retry_policies_get_the_service_defaults(subscriber, publisher, topic):
    dlq = publisher.create_topic(name=unique("topics")).name

    created = subscriber.create_subscription(
        request={
            "name": unique("subscriptions"),
            "topic": topic,
            "dead_letter_policy": {"dead_letter_topic": dlq},
            "retry_policy": {},
        }
    )

    assert created.dead_letter_policy.max_delivery_attempts == 5
    assert created.retry_policy.minimum_backoff.total_seconds() == 10
    assert created.retry_policy.maximum_backoff.total_seconds() == 600


def test_creating_an_existing_topic_or_subscription_is_already_exists(
    publisher, subscriber, topic, make_subscription
):
    sub = make_subscription()
    with pytest.raises(exceptions.AlreadyExists):
        publisher.create_topic(name=topic)
    with pytest.raises(exceptions.AlreadyExists):
        subscriber.create_subscription(name=sub, topic=topic)


def test_missing_resources_are_not_found(publisher, subscriber):
    with pytest.raises(exceptions.NotFound):
        publisher.get_topic(topic=unique("topics"))
    with pytest.raises(exceptions.NotFound):
        publisher.publish(unique("topics"), b"x").result(timeout=10)
    with pytest.raises(exceptions.NotFound):
        subscriber.create_subscription(name=unique("subscriptions"), topic=unique("topics"))
    with pytest.raises(exceptions.NotFound):
        subscriber.pull(subscription=unique("subscriptions"), max_messages=1)


@pytest.mark.parametrize(
    "topic_id",
    ["ab", "1starts-with-digit", "goog-reserved", "has space", "x" * 256, "bad/slash"],
)
def test_invalid_topic_names_are_rejected(publisher, topic_id):
    with pytest.raises(exceptions.InvalidArgument):
        publisher.create_topic(name=f"projects/{PROJECT}/topics/{topic_id}")


def test_a_topic_id_may_use_every_allowed_character(publisher):
    name = f"projects/{PROJECT}/topics/Ok-_.~+%{unique('topics')[-12:]}"
    assert publisher.create_topic(name=name).name == name


@pytest.mark.parametrize("deadline", [5, 601])
def test_ack_deadlines_outside_10_to_600_seconds_are_rejected(subscriber, topic, deadline):
    with pytest.raises(exceptions.InvalidArgument):
        subscriber.create_subscription(
            request={
                "name": unique("subscriptions"),
                "topic": topic,
                "ack_deadline_seconds": deadline,
            }
        )


def test_topics_and_subscriptions_are_listed_page_by_page(publisher, subscriber):
    project = f"paging-{unique('topics')[-12:]}"
    topics = sorted(
        publisher.create_topic(name=f"projects/{project}/topics/t-{i}").name for i in range(5)
    )
    subs = [
        subscriber.create_subscription(
            name=f"projects/{project}/subscriptions/s-{i}", topic=topics[0]
        ).name
        for i in range(3)
    ]

    first_page = next(
        iter(
            publisher.list_topics(request={"project": f"projects/{project}", "page_size": 2}).pages
        )
    )
    listed = [
        t.name
        for t in publisher.list_topics(request={"project": f"projects/{project}", "page_size": 2})
    ]

    assert [t.name for t in first_page.topics] == topics[:2]
    assert first_page.next_page_token
    assert listed == topics
    assert [
        s.name
        for s in subscriber.list_subscriptions(
            request={"project": f"projects/{project}", "page_size": 2}
        )
    ] == sorted(subs)
    assert list(
        publisher.list_topic_subscriptions(request={"topic": topics[0], "page_size": 1})
    ) == sorted(subs)


def test_deleting_a_topic_leaves_its_subscriptions_on_the_deleted_topic(
    publisher, subscriber, topic, make_subscription
):
    sub = make_subscription()

    publisher.delete_topic(topic=topic)

    assert subscriber.get_subscription(subscription=sub).topic == "_deleted-topic_"
    with pytest.raises(exceptions.NotFound):
        publisher.get_topic(topic=topic)


def test_a_deleted_subscription_is_gone(subscriber, make_subscription):
    sub = make_subscription()
    subscriber.delete_subscription(subscription=sub)
    with pytest.raises(exceptions.NotFound):
        subscriber.get_subscription(subscription=sub)


def test_update_subscription_changes_only_the_masked_fields(subscriber, make_subscription):
    sub = make_subscription(ack_deadline_seconds=30, labels={"keep": "me"})

    updated = subscriber.update_subscription(
        subscription={
            "name": sub,
            "ack_deadline_seconds": 45,
            "labels": {"ignored": "x"},
            "retry_policy": {"minimum_backoff": {"seconds": 1}},
        },
        update_mask=field_mask_pb2.FieldMask(paths=["ack_deadline_seconds", "retry_policy"]),
    )

    assert updated.ack_deadline_seconds == 45
    assert updated.labels == {"keep": "me"}
    assert updated.retry_policy.minimum_backoff.total_seconds() == 1
    assert subscriber.get_subscription(subscription=sub) == updated


def test_update_subscription_rejects_an_immutable_field(subscriber, make_subscription):
    sub = make_subscription()
    with pytest.raises(exceptions.InvalidArgument):
        subscriber.update_subscription(
            subscription={"name": sub, "enable_message_ordering": True},
            update_mask=field_mask_pb2.FieldMask(paths=["enable_message_ordering"]),
        )


def test_a_publish_of_an_empty_message_is_invalid(publisher, topic):
    with pytest.raises(exceptions.InvalidArgument):
        publisher.publish(topic, b"").result(timeout=10)
