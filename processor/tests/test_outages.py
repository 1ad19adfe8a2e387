"""Outages the processor must ride out without dead-lettering a valid message: one longer than
the maximum lease, a database that stops answering, and a table that refuses every row."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import pytest

from emulator import Emulator
from emulator.testing import free_port, wait_until
from processor.tests.chaos import ProxyCut, SqliteWriteLock, database_address, proxied_url
from processor.tests.conftest import Pipeline, http_get, metric
from processor.tests.tcpproxy import tcp_proxy
from processor.tests.test_processor import observations, publish_observations, reaches_oracle


@contextlib.contextmanager
def outage_of(url: str) -> Iterator[tuple[str, ProxyCut | SqliteWriteLock]]:
    """A URL for the processor and a way to make that database unwritable: another connection
    holding SQLite's write lock, or PostgreSQL's connections cut at a TCP proxy."""
    if url.startswith("sqlite"):
        lock = SqliteWriteLock(url.removeprefix("sqlite:///"))
        try:
            yield url, lock
        finally:
            lock.close()
        return
    with tcp_proxy(*database_address(url)) as proxy:
        yield proxied_url(url, proxy.address), ProxyCut(proxy)


def test_an_outage_longer_than_the_maximum_lease_dead_letters_nothing_and_holds_one_batch(
    emulator_host: str,
    make_pipeline: Callable[..., Pipeline],
    any_database_url: str,
) -> None:
    # Given a subscription that dead-letters after 5 deliveries, and a processor whose
    # messages may wait 2 s for their commit
    port = free_port()
    with outage_of(any_database_url) as (url, outage):
        pipeline = make_pipeline(
            database_url=url,
            setup={"max_delivery_attempts": 5},
            metrics_port=port,
            max_lease_seconds=2,
            lease_seconds=10,
            batch_size=50,
        )
        stop = pipeline.start_processor()
        first, second = observations(50, keys=50, seed=31), observations(600, keys=250, seed=32)
        publish_observations(pipeline, first)
        assert reaches_oracle(pipeline, first)
        # When the database is away for many times that, while 600 messages wait
        outage.begin()
        try:
            publish_observations(pipeline, second)
            assert wait_until(lambda: metric(port, "mini_scan_streams_paused") == 1, timeout=30)
            # Then it keeps only the batch it is retrying, and Pub/Sub keeps the rest: no
            # redelivery, so no delivery attempt is spent while the outage lasts
            received = metric(port, "mini_scan_messages_received_total")
            deadline = time.monotonic() + 12  # six maximum leases
            while time.monotonic() < deadline:  # an invariant held over time
                assert metric(port, "mini_scan_messages_held") <= 50
                assert metric(port, "mini_scan_messages_received_total") == received
                assert http_get(port, "/readyz")[0] == 503
                time.sleep(0.5)
        finally:
            outage.end()
        # And it resumes by itself, stores everything, and dead-letters nothing
        assert reaches_oracle(pipeline, first + second, timeout=60)
        assert wait_until(lambda: metric(port, "mini_scan_streams_paused") == 0, timeout=15)
        assert wait_until(lambda: http_get(port, "/readyz")[0] == 200, timeout=15)
        assert stop() == 0
    assert pipeline.dead_letters(expected=1, timeout=2) == []


@pytest.fixture(autouse=True)
def _no_leaked_faults(our_emulator: Emulator) -> Iterator[None]:
    our_emulator.faults.clear()
    yield
    our_emulator.faults.clear()
