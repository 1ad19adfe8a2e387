"""A consumer never goes quietly deaf, and leases never lapse behind a slow request: a connection
that stops forwarding without FIN or RST, a stream the service stops serving, an Acknowledge
held past the lease, a stop under steady flow, and a dead sender thread."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import grpc
import pytest

from emulator import Emulator
from emulator.faults import Faults
from emulator.testing import free_port, wait_until
from processor.pipeline.dispatcher import Dispatcher
from processor.tests.helpers.chaos import (
    DeliveryReport,
    SqliteWriteLock,
    describe_difference,
    pull_dead_letters,
    reaches,
    scan_workload,
)
from processor.tests.helpers.pipeline import Pipeline, ProcessorProcess, http_get, metric
from processor.tests.helpers.tcpproxy import tcp_proxy

# gRPC keepalive notices a dead connection in 40-70 s (runtime/pubsub.py); the drain follows.
RECOVERY_TIMEOUT = 120
# A child processor's start is not what is tested; on a busy machine it can take a minute.
STARTUP_TIMEOUT = 120


def assert_nothing_dead_lettered(pipeline: Pipeline) -> None:
    letters = pull_dead_letters(
        pipeline.settings.dead_letter_subscription_path, lambda _: False, timeout=1, settle=0
    )
    assert letters == []


def publish(pipeline: Pipeline, workload, part) -> None:
    workload.record(part, pipeline.publish(m.data for m in part))


def test_a_connection_that_goes_silent_is_replaced_and_the_backlog_drained(
    our_emulator: Emulator,
    emulator_host: str,
    make_pipeline: Callable[..., Pipeline],
    spawn_processor: Callable[..., ProcessorProcess],
) -> None:
    """Catches a channel without gRPC keepalive: the processor then never opens a new
    connection and the second half is never stored. With CONSUMER=client, also acks and
    extensions left to the client's own 60 s of retries: keepalive ends the dead connection
    at about the same moment, and when their retries run out first the client closes its
    streams for good and the processor exits."""
    # Given a processor reaching the broker through a proxy, done with a first half
    pipeline = make_pipeline()
    url = pipeline.settings.database_url
    workload = scan_workload(61, 1500, keys=None, duplicates=0.1, out_of_order=0.2, malformed=0)
    first, second = workload.messages[:500], workload.messages[500:]
    state = our_emulator.broker.subscription(pipeline.settings.subscription_path)
    state.start_trace()
    host, port = our_emulator.address.rsplit(":", 1)
    with tcp_proxy(host, int(port)) as proxy:
        child = spawn_processor(pipeline, PUBSUB_EMULATOR_HOST=proxy.address)
        child.wait_ready(timeout=STARTUP_TIMEOUT)
        publish(pipeline, workload, first)
        acked = lambda: metric(child.metrics_port, "mini_scan_messages_acked_total")  # noqa: E731
        assert wait_until(lambda: acked() >= len(first), timeout=30), child.output()
        # When the proxy stops forwarding on the open connections (no FIN, no RST; new ones
        # pass) and 1,000 more messages are published
        proxy.silence()
        silenced_at = time.monotonic()
        publish(pipeline, workload, second)
        # Then the processor notices, reconnects, and the table reaches the oracle
        expected = workload.expected_rows()
        explain = DeliveryReport(state, workload, metrics_port=child.metrics_port)
        assert reaches(url, expected, RECOVERY_TIMEOUT), (
            f"{describe_difference(url, expected, explain)}\n{child.output()[-6000:]}"
        )
        print(f"recovered {time.monotonic() - silenced_at:.1f}s after the silence")
        assert_nothing_dead_lettered(pipeline)
        child.signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 0, child.output()


# The batch consumer's dispatcher has always bounded its own requests (a third of a lease).
@pytest.mark.parametrize("consumer", ["client"])
def test_acks_failing_longer_than_the_client_retries_them_do_not_stop_the_processor(
    our_emulator: Emulator,
    emulator_host: str,
    faults: Faults,
    make_pipeline: Callable[..., Pipeline],
) -> None:
    """Catches acks left to the client library's own retries (60 s on UNAVAILABLE): when they
    run out, the library closes its stream manager, as behind a silent connection that
    keepalive ends at about the same moment. Its streams end at once; the processor then
    exits (`stream_ended`) once the manager's other requests have run out too, or waits with
    no stream open until the watch reopens them."""
    # Given a processor whose every Acknowledge fails with UNAVAILABLE, for longer than 60 s
    port = free_port()
    pipeline = make_pipeline(metrics_port=port)
    url = pipeline.settings.database_url
    workload = scan_workload(67, 200, keys=None, duplicates=0.0, out_of_order=0.0, malformed=0)
    state = our_emulator.broker.subscription(pipeline.settings.subscription_path)
    stop = pipeline.start_processor()
    streams = pipeline.settings.streams
    assert wait_until(lambda: state.stream_count() == streams, timeout=20)
    faults.fail_next("Acknowledge", n=10**9, code=grpc.StatusCode.UNAVAILABLE)
    publish(pipeline, workload, workload.messages)
    expected = workload.expected_rows()
    assert reaches(url, expected, 30), describe_difference(url, expected)
    # When that lasts 65 s
    now = time.monotonic()
    deadline, all_open_at = now + 65, now
    while now < deadline:  # an invariant held over time
        # Then the processor keeps its streams open (a reopening takes a moment at most)
        if state.stream_count() == streams:
            all_open_at = now
        assert now - all_open_at < 5, f"{state.stream_count()} of {streams} streams open for 5 s"
        time.sleep(0.5)
        now = time.monotonic()
    # And once acks pass again, every message is acked and it stops cleanly
    faults.clear()
    assert wait_until(lambda: state.backlog() == (0, 0), timeout=60), state.describe()
    assert stop() == 0
    assert_nothing_dead_lettered(pipeline)


def test_a_stream_the_service_stops_serving_is_reopened_and_the_backlog_drained(
    emulator_host: str, faults: Faults, make_pipeline: Callable[..., Pipeline]
) -> None:
    """Catches a consumer without the stream watch: silent streams stay open for good (their
    transport is healthy, keepalive cannot tell) and nothing published after is stored."""
    # Given a running processor that has consumed a first part
    port = free_port()
    pipeline = make_pipeline(metrics_port=port)
    url = pipeline.settings.database_url
    workload = scan_workload(62, 1200, keys=None, duplicates=0.1, out_of_order=0.2, malformed=0)
    first, second = workload.messages[:200], workload.messages[200:]
    stop = pipeline.start_processor()
    publish(pipeline, workload, first)
    assert wait_until(lambda: metric(port, "mini_scan_messages_acked_total") >= len(first), 30)
    # When the service stops serving every open stream, without ending it, and more arrives
    faults.silence_streams()
    silenced_at = time.monotonic()
    publish(pipeline, workload, second)
    # Then the deaf streams are reopened, counted with their cause, and the backlog drained
    expected = workload.expected_rows()
    assert reaches(url, expected, 60), describe_difference(url, expected)
    print(f"recovered {time.monotonic() - silenced_at:.1f}s after the silence")
    silent = 'mini_scan_stream_reconnects_total{cause="silent"}'
    assert metric(port, silent) >= 1
    assert wait_until(lambda: http_get(port, "/readyz")[0] == 200, timeout=10)
    assert stop() == 0
    assert_nothing_dead_lettered(pipeline)


def test_an_ack_held_past_the_lease_lets_no_lease_of_a_waiting_batch_lapse(
    emulator_host: str,
    our_emulator: Emulator,
    faults: Faults,
    make_pipeline: Callable[..., Pipeline],
) -> None:
    """Catches extensions sent behind acks: held for the ack, they stop, and the waiting
    batch's leases (10 s) lapse and it is delivered again."""
    # Given a processor with 10 s leases whose Acknowledge calls are held 30 s for a while
    port = free_port()
    pipeline = make_pipeline(metrics_port=port, lease_seconds=10, batch_size=100)
    url = pipeline.settings.database_url
    workload = scan_workload(63, 301, keys=None, duplicates=0.0, out_of_order=0.0, malformed=0)
    first, waiting = workload.messages[:1], workload.messages[1:]
    stop = pipeline.start_processor()
    lock = SqliteWriteLock(url.removeprefix("sqlite:///"))
    try:
        faults.hold("Acknowledge", delay=30, for_seconds=4)
        publish(pipeline, workload, first)
        assert wait_until(lambda: metric(port, "mini_scan_messages_acked_total") >= 1, 10)
        # When a batch then waits 25 s on a database another connection holds locked, while
        # that ack hangs
        lock.begin()
        publish(pipeline, workload, waiting)
        received = lambda: metric(port, "mini_scan_messages_received_total")  # noqa: E731
        assert wait_until(lambda: received() >= len(workload.messages), timeout=10)
        time.sleep(25)  # the slow database itself: more than two leases
        lock.end()
    finally:
        lock.close()
    # Then the batch commits, and none of its messages was delivered twice (the held ack's
    # one message may be: its ack was lost)
    expected = workload.expected_rows()
    assert reaches(url, expected, 30), describe_difference(url, expected)
    state = our_emulator.broker.subscription(pipeline.settings.subscription_path)
    assert wait_until(lambda: state.backlog() == (0, 0), timeout=40)
    assert received() <= len(workload.messages) + len(first)
    assert stop() == 0
    assert_nothing_dead_lettered(pipeline)


# Our own consumer only: the client library nacks what it received but had not yet called back
# for when its streams close (as many as its flow-control buffer held), which its public API
# offers no way around.
@pytest.mark.parametrize("consumer", ["batch"])
def test_sigterm_under_steady_flow_hands_nothing_back(
    our_emulator: Emulator,
    emulator_host: str,
    make_pipeline: Callable[..., Pipeline],
    spawn_processor: Callable[..., ProcessorProcess],
) -> None:
    """Catches a stop that closes the batcher before the streams: deliveries that arrive
    while the writer drains are decoded, then handed back (an extra delivery attempt each)."""
    # Given a processor under a steady flow of messages
    pipeline = make_pipeline()
    child = spawn_processor(pipeline)
    child.wait_ready(timeout=STARTUP_TIMEOUT)
    workload = scan_workload(64, 6000, keys=None, duplicates=0.0, out_of_order=0.0, malformed=0)
    parts = [workload.messages[i : i + 100] for i in range(0, len(workload.messages), 100)]
    publishing = threading.Thread(target=lambda: [publish(pipeline, workload, p) for p in parts])
    publishing.start()
    try:
        assert wait_until(
            lambda: metric(child.metrics_port, "mini_scan_messages_acked_total") >= 1000, 30
        )
        # When it is asked to stop mid-flow
        child.signal(signal.SIGTERM)
        assert child.wait(timeout=30) == 0, child.output()
    finally:
        publishing.join()
    # Then the streams stopped first: nothing was handed back, so no message waiting has been
    # delivered before (a handed-back one returns after the retry policy's backoff, <= 1 s;
    # the ones in flight when the streams closed return only once their lease ends, 20 s)
    state = our_emulator.broker.subscription(pipeline.settings.subscription_path)
    assert not wait_until(lambda: state.delivered_before() > 0, timeout=3), (
        f"{state.delivered_before()} handed back at the stop"
    )
    print(f"{state.delivered_before()} handed back at the stop")
    [done] = [e for e in child.events() if e.get("event") == "shutdown_complete"]
    assert done["flushed"] is True
    assert done["handed_back_at_stop"] == 0, done


@pytest.mark.parametrize("consumer", ["batch"])  # the client library runs its own ack threads
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_ack_sender_makes_healthz_fail(
    emulator_host: str, make_pipeline: Callable[..., Pipeline], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches `alive()` that watches only the writer: acks would stop with /healthz at 200."""
    port = free_port()
    pipeline = make_pipeline(metrics_port=port)

    def broken(self: Dispatcher, kind: str, ack_ids: list[str]) -> None:
        if kind == "ack" and ack_ids:
            raise RuntimeError("a bug in the ack path")

    monkeypatch.setattr(Dispatcher, "send", broken)
    stop = pipeline.start_processor()
    assert wait_until(lambda: http_get(port, "/healthz")[0] == 200, timeout=20)
    workload = scan_workload(65, 10, keys=None, duplicates=0.0, out_of_order=0.0, malformed=0)
    publish(pipeline, workload, workload.messages)
    assert wait_until(lambda: http_get(port, "/healthz")[0] == 503, timeout=20)
    stop()


def test_a_pause_in_a_long_outage_keeps_the_retried_batch_leased_and_acks_it_after(
    our_emulator: Emulator, emulator_host: str, make_pipeline: Callable[..., Pipeline]
) -> None:
    """Catches a pause that ends the lease machinery (CONSUMER=client closed the library's):
    the batch the writer retries lapses while paused, and its acks after the commit are lost."""
    # Given a processor whose messages may wait 2 s for their commit, with 10 s leases
    port = free_port()
    pipeline = make_pipeline(
        metrics_port=port, max_lease_seconds=2, lease_seconds=10, batch_size=50
    )
    url = pipeline.settings.database_url
    workload = scan_workload(66, 350, keys=None, duplicates=0.0, out_of_order=0.0, malformed=0)
    first, second = workload.messages[:50], workload.messages[50:]
    stop = pipeline.start_processor()
    publish(pipeline, workload, first)
    assert wait_until(lambda: metric(port, "mini_scan_messages_acked_total") >= 50, 30)
    state = our_emulator.broker.subscription(pipeline.settings.subscription_path)
    lock = SqliteWriteLock(url.removeprefix("sqlite:///"))
    try:
        # When the database is away long enough for the streams to pause, for two leases
        lock.begin()
        publish(pipeline, workload, second)
        assert wait_until(lambda: metric(port, "mini_scan_streams_paused") == 1, timeout=30)
        kept = metric(port, "mini_scan_messages_held")
        assert kept > 0
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:  # an invariant held over time
            # Then the batch it keeps stays leased to it the whole time
            assert state.backlog()[1] >= kept, "the kept batch's leases lapsed"
            time.sleep(0.5)
    finally:
        lock.end()
        lock.close()
    # And once it commits, its acks arrive: nothing is left leased or delivered twice
    expected = workload.expected_rows()
    assert reaches(url, expected, 60), describe_difference(url, expected)
    assert wait_until(lambda: state.backlog() == (0, 0), timeout=30)
    assert not wait_until(lambda: state.delivered_before() > 0, timeout=12)
    assert stop() == 0
    assert_nothing_dead_lettered(pipeline)
