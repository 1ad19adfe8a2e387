"""The processor end to end, in-process: real emulator, real client, real databases."""

from __future__ import annotations

import os
import random
import time

from emulator.testing import free_port, wait_until
from processor.storage import migrate, open_engine
from processor.tests.helpers.oracle import expected_rows
from processor.tests.helpers.pipeline import (
    http_get,
    metric,
    observations,
    publish_observations,
    reaches_oracle,
)
from processor.tests.helpers.tcpproxy import tcp_proxy
from processor.tests.helpers.wire import BAD_INPUTS, CATALOGUE_MAX_BYTES, scan

NOW = int(time.time())
# How long the database stays unreachable in the outage test beyond the moment the processor
# notices; OUTAGE_SECONDS=300 reproduces the five-minute outage of docs/reliability.md.
OUTAGE_SECONDS = float(os.environ.get("OUTAGE_SECONDS", "1"))


def test_both_hello_world_forms_are_stored_as_text(any_emulator_host, make_pipeline):
    pipeline = make_pipeline()
    pipeline.publish(
        [
            scan("1.1.1.1", 80, "HTTP", NOW, "hello world", version=1),
            scan("1.1.1.2", 22, "SSH", NOW, "hello world", version=2),
        ]
    )

    stop = pipeline.start_processor()

    assert wait_until(lambda: len(pipeline.rows()) == 2, timeout=20)
    assert {row.response for row in pipeline.rows()} == {"hello world"}
    assert stop() == 0


def test_duplicated_and_out_of_order_deliveries_end_at_the_oracle(any_emulator_host, make_pipeline):
    # Given 600 scans of 30 keys, a third of them published twice, in shuffled order
    pipeline = make_pipeline()
    items = observations(600, keys=30)
    deliveries = items + random.Random(2).sample(items, 200)
    random.Random(3).shuffle(deliveries)
    publish_observations(pipeline, deliveries)
    # When the processor drains the subscription
    stop = pipeline.start_processor()
    # Then each key holds its newest scan and its oldest first_seen
    assert reaches_oracle(pipeline, items)
    assert stop() == 0


def test_every_rejection_lands_on_the_dead_letter_topic_with_its_reason(
    our_emulator, emulator_host, make_pipeline
):
    """Kills: no ack after a confirmed dead letter (`_dead_letter_settled`), a dead letter sent
    twice, a reason lost."""
    # Given each kind of bad input, each between two good messages
    pipeline = make_pipeline(max_message_bytes=CATALOGUE_MAX_BYTES)
    good = observations(2 * len(BAD_INPUTS) + 2, keys=250, seed=4)
    for i, (label, body, _) in enumerate(BAD_INPUTS):
        publish_observations(pipeline, good[2 * i : 2 * i + 2])
        pipeline.publish([body], case=label)
    publish_observations(pipeline, good[-2:])
    # When the processor runs
    stop = pipeline.start_processor()
    # Then every bad message is dead-lettered once, with its reason, and every good one stored
    letters = pipeline.dead_letters(expected=len(BAD_INPUTS))
    assert sorted((m.attributes["case"], m.attributes["reason"]) for m in letters) == sorted(
        (label, str(reason)) for label, _, reason in BAD_INPUTS
    )
    bodies = {label: body for label, body, _ in BAD_INPUTS}
    for letter in letters:
        assert letter.data == bodies[letter.attributes["case"]]  # the original bytes
        assert letter.attributes["error"]
        assert letter.attributes["source_subscription"] == pipeline.settings.subscription_path
        assert letter.attributes["source_message_id"]
    assert reaches_oracle(pipeline, good)
    # And each was acked: the emulator holds nothing for the subscription while the processor
    # still runs (unacked, the lease keeper would extend them until shutdown handed them back)
    assert wait_until(lambda: pipeline.backlog(our_emulator) == (0, 0), timeout=10), (
        pipeline.backlog(our_emulator)
    )
    assert stop() == 0
    assert pipeline.dead_letters(expected=1, timeout=1) == []  # dead-lettered once, not looped


def test_a_row_the_database_refuses_is_dead_lettered_alone(
    our_emulator, emulator_host, make_pipeline, postgres_url
):
    """Kills: the refused row's batch not split (`refusals.py`), the culprit not dead-lettered
    or not acked (`Processor.committed`)."""
    # Given a constraint one row of a batch breaks (as a migration could add); the decoder admits
    # only values both databases can store, so it takes a constraint to refuse one
    engine = open_engine(postgres_url)
    migrate(engine)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "ALTER TABLE services ADD CONSTRAINT no_poison CHECK (response <> 'poison')"
        )
    engine.dispose()
    pipeline = make_pipeline(database_url=postgres_url, batch_max_wait_ms=500)
    good = observations(40, keys=40, seed=5)
    publish_observations(pipeline, good[:20])
    pipeline.publish([scan("9.9.9.9", 1, "HTTP", NOW, "poison")], case="poison")
    publish_observations(pipeline, good[20:])
    # When the processor stores the batch
    stop = pipeline.start_processor()
    # Then only that message is dead-lettered, as storage_rejected, and the rest is stored
    letters = pipeline.dead_letters(expected=1)
    assert [(m.attributes["case"], m.attributes["reason"]) for m in letters] == [
        ("poison", "storage_rejected")
    ]
    assert "no_poison" in letters[0].attributes["error"]
    assert reaches_oracle(pipeline, good)
    assert wait_until(lambda: pipeline.backlog(our_emulator) == (0, 0), timeout=10)
    assert stop() == 0
    assert pipeline.dead_letters(expected=1, timeout=1) == []


def test_nothing_is_acked_while_its_commit_waits(
    our_emulator, emulator_host, make_pipeline, postgres_url
):
    """Kills an ack sent after the batch's statement but before its COMMIT returned (e.g.
    `upsert_many` reporting success while the commit is still under way): the stall here is
    at COMMIT itself, after the statement ran, unlike a write lock that stalls the statement."""
    # Given a table whose commits wait for a lock the test holds: a deferred constraint
    # trigger runs at COMMIT and takes the lock there
    key = random.randrange(2**31)
    engine = open_engine(postgres_url)
    migrate(engine)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE OR REPLACE FUNCTION wait_at_commit() RETURNS trigger LANGUAGE plpgsql "
            "AS $$ BEGIN "
            f"PERFORM pg_advisory_lock_shared({key}); PERFORM pg_advisory_unlock_shared({key}); "
            "RETURN NULL; END $$"
        )
        connection.exec_driver_sql(
            "CREATE CONSTRAINT TRIGGER wait_at_commit AFTER INSERT OR UPDATE ON services "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION wait_at_commit()"
        )
    pipeline = make_pipeline(database_url=postgres_url)
    items = observations(50, keys=50, seed=10)
    with engine.connect() as holder:
        holder.exec_driver_sql(f"SELECT pg_advisory_lock({key})")
        # When a batch's statement has run and its COMMIT waits
        stop = pipeline.start_processor()
        publish_observations(pipeline, items)
        assert wait_until(lambda: _waiting_commits(engine) >= 1, timeout=20)
        # Then none of its messages is acked: all still leased or ready in the emulator
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:  # an invariant held over time
            ready, leased = pipeline.backlog(our_emulator)
            assert ready + leased == len(items), f"{len(items) - ready - leased} acked early"
            time.sleep(0.2)
        assert pipeline.rows() == []
        holder.exec_driver_sql(f"SELECT pg_advisory_unlock({key})")
        holder.commit()
    # And once the commit completes, everything is stored and acked
    assert reaches_oracle(pipeline, items)
    assert wait_until(lambda: pipeline.backlog(our_emulator) == (0, 0), timeout=10)
    assert stop() == 0
    engine.dispose()


def _waiting_commits(engine) -> int:
    """Sessions of this database whose COMMIT waits on an advisory lock."""
    with engine.connect() as connection:
        return connection.exec_driver_sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event = 'advisory' AND upper(query) = 'COMMIT'"
        ).scalar_one()


def test_a_database_outage_loses_nothing_and_dead_letters_nothing(
    emulator_host, make_pipeline, postgres_url
):
    host_port = postgres_url.split("@", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1) if ":" in host_port else (host_port, "5432")
    with tcp_proxy(host, int(port)) as proxy:
        proxied = postgres_url.replace(host_port, proxy.address)
        metrics_port = free_port()
        pipeline = make_pipeline(database_url=proxied, metrics_port=metrics_port)
        first, second = observations(100, keys=100, seed=6), observations(300, keys=200, seed=7)
        stop = pipeline.start_processor()
        publish_observations(pipeline, first)
        assert reaches_oracle(pipeline, first)
        # When the database becomes unreachable while messages keep coming
        proxy.cut()
        publish_observations(pipeline, second)
        assert wait_until(lambda: http_get(metrics_port, "/readyz")[0] == 503, timeout=15)
        assert metric(metrics_port, "mini_scan_storage_retries_total") >= 1
        assert http_get(metrics_port, "/healthz")[0] == 200  # alive, only not ready
        time.sleep(OUTAGE_SECONDS)  # pacing the outage, not synchronisation
        proxy.restore()
        # Then processing resumes by itself and everything is stored
        assert reaches_oracle(pipeline, first + second)
        assert wait_until(lambda: http_get(metrics_port, "/readyz")[0] == 200, timeout=15)
        assert stop() == 0
    assert pipeline.dead_letters(expected=1, timeout=1) == []


def test_two_processors_share_the_work_and_end_at_the_oracle(emulator_host, make_pipeline):
    pipeline = make_pipeline()
    ports = [free_port(), free_port()]
    stops = [pipeline.start_processor(metrics_port=port) for port in ports]
    for port in ports:
        assert wait_until(lambda p=port: http_get(p, "/readyz")[0] == 200, timeout=20)
    items = observations(3000, keys=250, seed=8)

    publish_observations(pipeline, items)

    assert reaches_oracle(pipeline, items)
    # A row is visible at its commit, its ack counted just after: wait for the count.
    acked = lambda: [metric(port, "mini_scan_messages_acked_total") for port in ports]  # noqa: E731
    assert wait_until(lambda: sum(acked()) >= len(items), timeout=10), acked()
    assert all(count > 0 for count in acked()), acked()
    assert [stop() for stop in stops] == [0, 0]


def test_metrics_count_received_acked_rows_and_dead_letters(emulator_host, make_pipeline):
    port = free_port()
    pipeline = make_pipeline(metrics_port=port)
    items = observations(50, keys=50, seed=9)
    publish_observations(pipeline, items)
    pipeline.publish([b"not json"])

    stop = pipeline.start_processor()

    assert wait_until(lambda: metric(port, "mini_scan_messages_acked_total") == 51, timeout=20)
    assert metric(port, "mini_scan_messages_received_total") == 51
    assert metric(port, 'mini_scan_messages_dead_lettered_total{reason="invalid_json"}') == 1
    assert metric(port, 'mini_scan_rows_total{outcome="inserted"}') == len(expected_rows(items))
    assert metric(port, "mini_scan_publish_to_commit_seconds_count") == 50
    assert wait_until(lambda: metric(port, "mini_scan_ready") == 1, timeout=5)
    assert metric(port, "mini_scan_database_up") == 1
    assert stop() == 0
