"""The REST paths of Google's emulator, spoken with urllib in the API's camelCase JSON."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

from emulator.tests.helpers import PROJECT, unique


def test_rest_publish_pull_and_acknowledge_round_trip(rest):
    topic, sub = unique("topics"), unique("subscriptions")
    assert rest("PUT", topic)[0] == 200
    status, created = rest("PUT", sub, {"topic": topic, "ackDeadlineSeconds": 20})
    assert (status, created["ackDeadlineSeconds"], created["topic"]) == (200, 20, topic)

    data = base64.b64encode(b"over-http").decode()
    status, published = rest(
        "POST", f"{topic}:publish", {"messages": [{"data": data, "attributes": {"k": "v"}}]}
    )
    assert status == 200
    assert len(published["messageIds"]) == 1

    status, pulled = rest("POST", f"{sub}:pull", {"maxMessages": 10})
    [received] = pulled["receivedMessages"]
    assert base64.b64decode(received["message"]["data"]) == b"over-http"
    assert received["message"]["attributes"] == {"k": "v"}
    assert received["message"]["messageId"] == published["messageIds"][0]

    assert rest("POST", f"{sub}:acknowledge", {"ackIds": [received["ackId"]]}) == (200, {})
    assert rest("POST", f"{sub}:pull", {"maxMessages": 10, "returnImmediately": True}) == (200, {})


def test_rest_modify_ack_deadline_zero_redelivers(rest):
    topic, sub = unique("topics"), unique("subscriptions")
    rest("PUT", topic)
    rest("PUT", sub, {"topic": topic})
    rest("POST", f"{topic}:publish", {"messages": [{"data": base64.b64encode(b"n").decode()}]})
    first = rest("POST", f"{sub}:pull", {"maxMessages": 1})[1]["receivedMessages"][0]

    status, _ = rest(
        "POST", f"{sub}:modifyAckDeadline", {"ackIds": [first["ackId"]], "ackDeadlineSeconds": 0}
    )

    again = rest("POST", f"{sub}:pull", {"maxMessages": 1})[1]["receivedMessages"][0]
    assert status == 200
    assert again["message"]["messageId"] == first["message"]["messageId"]
    assert again["ackId"] != first["ackId"]


def test_rest_get_list_and_delete(rest):
    project = f"rest-{unique('topics')[-12:]}"
    topic, sub = f"projects/{project}/topics/topic-a", f"projects/{project}/subscriptions/sub-a"
    rest("PUT", topic)
    rest("PUT", sub, {"topic": topic})

    assert rest("GET", topic) == (200, {"name": topic})
    assert rest("GET", f"projects/{project}/topics")[1] == {"topics": [{"name": topic}]}
    assert rest("GET", f"{topic}/subscriptions")[1] == {"subscriptions": [sub]}
    assert [
        s["name"] for s in rest("GET", f"projects/{project}/subscriptions")[1]["subscriptions"]
    ] == [sub]
    assert rest("DELETE", sub) == (200, {})
    assert rest("GET", sub)[0] == 404


def test_rest_errors_carry_the_canonical_status(rest):
    status, body = rest("PUT", f"projects/{PROJECT}/topics/no")
    assert status == 400
    assert body["error"]["status"] == "INVALID_ARGUMENT"
    topic = unique("topics")
    rest("PUT", topic)
    assert rest("PUT", topic)[1]["error"]["status"] == "ALREADY_EXISTS"
    assert rest("GET", unique("topics"))[1]["error"]["status"] == "NOT_FOUND"


def test_the_emulator_serves_its_counters_at_emulator_stats(emulator):
    url = f"http://{emulator.rest_address}/emulator/stats"

    with urllib.request.urlopen(url, timeout=10) as resp:
        stats = json.loads(resp.read())

    after = emulator.stats()
    assert set(stats) == set(after) == {"dead_lettered", "dead_letter_forward_failures"}
    assert all(0 <= stats[name] <= after[name] for name in stats), "the same counters"
