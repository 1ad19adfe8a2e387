"""`mini-scan dlq list` and `replay` against dead letters on a real emulator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from google.cloud import pubsub_v1

from emulator.testing import wait_until
from processor.commands.dlq import main


def seed_dead_letters(pipeline, letters: list[tuple[bytes, str]]) -> None:
    publisher = pubsub_v1.PublisherClient()
    futures = [
        publisher.publish(
            pipeline.settings.dead_letter_topic_path,
            data,
            reason=reason,
            error="why",
            source_message_id="1",
            origin="scanner-7",
        )
        for data, reason in letters
    ]
    for future in futures:
        future.result(timeout=10)


def names(pipeline) -> list[str]:
    s = pipeline.settings
    return [
        "--pubsub-topic",
        s.pubsub_topic,
        "--pubsub-subscription",
        s.pubsub_subscription,
        "--pubsub-dead-letter-topic",
        s.pubsub_dead_letter_topic,
        "--pubsub-dead-letter-subscription",
        s.pubsub_dead_letter_subscription,
    ]


def listed(pipeline, capsys) -> dict:
    capsys.readouterr()  # drop what set-up logged
    assert main(["list", "--json", *names(pipeline)]) == 0
    return json.loads(capsys.readouterr().out)


def test_list_counts_by_reason_and_consumes_nothing(emulator_host, make_pipeline, capsys):
    pipeline = make_pipeline()
    seed_dead_letters(pipeline, [(b"x", "invalid_json")] * 3 + [(b"{}", "invalid_schema")])

    first = listed(pipeline, capsys)
    second = listed(pipeline, capsys)

    assert first["by_reason"] == {"invalid_json": 3, "invalid_schema": 1}
    assert second["by_reason"] == first["by_reason"]
    assert first["samples"]["invalid_schema"][0]["data"] == "{}"


def test_replay_republishes_one_reason_and_removes_only_those(emulator_host, make_pipeline, capsys):
    pipeline = make_pipeline()
    seed_dead_letters(
        pipeline,
        [(b"port-1", "invalid_port"), (b"port-2", "invalid_port"), (b"junk", "invalid_json")],
    )

    capsys.readouterr()
    assert main(["replay", "--reason", "invalid_port", *names(pipeline)]) == 0
    assert "replayed 2" in capsys.readouterr().out

    subscriber = pubsub_v1.SubscriberClient()
    response = subscriber.pull(
        subscription=pipeline.settings.subscription_path, max_messages=10, timeout=10
    )
    replayed = sorted(m.message.data for m in response.received_messages)
    assert replayed == [b"port-1", b"port-2"]
    attributes = response.received_messages[0].message.attributes
    assert dict(attributes) == {"origin": "scanner-7"}  # dead-lettering's attributes stripped
    assert listed(pipeline, capsys)["by_reason"] == {"invalid_json": 1}


def test_a_replay_stopped_mid_way_hands_its_dead_letters_back_at_once(
    our_emulator, emulator_host, make_pipeline, tmp_path
):
    # Given three dead letters, and a main topic whose next publish stalls for 15 s
    pipeline = make_pipeline()
    seed_dead_letters(pipeline, [(b"port-1", "invalid_port")] * 3)
    our_emulator.faults.fail_next(
        "Publish", code=None, delay=15, topic=pipeline.settings.topic_path
    )
    dead_letters = our_emulator.broker.subscription(pipeline.settings.dead_letter_subscription_path)
    output = tmp_path / "replay.out"
    try:
        with open(output, "wb") as out:
            replay = subprocess.Popen(
                [sys.executable, "-m", "processor.cli", "dlq", "replay", *names(pipeline)],
                env=os.environ | {"PUBSUB_EMULATOR_HOST": emulator_host},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        # When the replay has leased them all (it then waits on its republish) and is stopped
        assert wait_until(lambda: dead_letters.backlog() == (0, 3) or replay.poll() is not None, 60)
        replay.send_signal(signal.SIGTERM)
        # Then it ends at once, not done: 143 and one line
        assert replay.wait(timeout=10) == 128 + signal.SIGTERM, output.read_text()
        # And the dead letters are on the subscription again now, not when their 10-minute
        # leases run out
        assert wait_until(lambda: dead_letters.backlog() == (3, 0), 5), dead_letters.backlog()
    finally:
        our_emulator.faults.clear()
        if replay.poll() is None:
            replay.kill()
    last = output.read_text().splitlines()[-1]  # stopped while reading, or after replaying 0
    assert last.startswith("mini-scan dlq: stopped ")
    assert last.endswith(f"; the rest stays on {pipeline.settings.dead_letter_subscription_path}")
    assert "Traceback" not in output.read_text()
