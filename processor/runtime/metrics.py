"""The processor's Prometheus metrics, and a histogram fed a whole batch at a time."""

from __future__ import annotations

import bisect
import itertools
import platform
import threading
import urllib.request
from collections.abc import Iterator, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import HistogramMetricFamily

from processor import version


class BatchHistogram:
    """A Prometheus histogram fed a whole batch at a time: one lock per batch instead of two
    per observation, which matters at thousands of messages a second."""

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self._name, self._documentation = name, documentation
        self._bounds = [float(b) for b in buckets]
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: Sequence[float]) -> None:
        bounds, counts = self._bounds, [0] * len(self._counts)
        for value in values:
            counts[bisect.bisect_left(bounds, value)] += 1
        with self._lock:
            self._counts = [a + b for a, b in zip(self._counts, counts, strict=True)]
            self._sum += sum(values)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative = list(itertools.accumulate(counts))
        labels = [*(repr(b) for b in self._bounds), "+Inf"]
        family = HistogramMetricFamily(self._name, self._documentation)
        family.add_metric([], list(zip(labels, cumulative, strict=True)), total)
        yield family


class Metrics:
    """The processor's Prometheus metrics, in a registry of its own (several per test process)."""

    def __init__(self) -> None:
        # No `_created` series beside each counter and histogram: a timestamp per series that
        # no rule or dashboard reads (process_start_time_seconds already says when it started).
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge(
            "mini_scan_build_info",
            "Always 1; the labels say which mini-scan and Python this process runs",
            ["version", "python"],
            registry=r,
        ).labels(version=version(), python=platform.python_version()).set(1)
        # process_start_time_seconds (the restart alert), CPU seconds and resident memory.
        ProcessCollector(registry=r)
        self.received = Counter("mini_scan_messages_received", "Messages delivered", registry=r)
        self.acked = Counter("mini_scan_messages_acked", "Messages acknowledged", registry=r)
        self.nacked = Counter("mini_scan_messages_nacked", "Messages handed back", registry=r)
        self.dead_lettered = Counter(
            "mini_scan_messages_dead_lettered", "Messages dead-lettered", ["reason"], registry=r
        )
        self.rows = Counter("mini_scan_rows", "Rows written, by outcome", ["outcome"], registry=r)
        self.lease_requests_failed = Counter(
            "mini_scan_lease_requests_failed",
            "Ack, nack or lease-extension requests that failed (the messages come back later)",
            ["request"],
            registry=r,
        )
        self.stream_reconnects = Counter(
            "mini_scan_stream_reconnects",
            "Streaming pulls reopened, by cause: the status that ended one (unavailable, ...) "
            "or silent (deaf while messages were ready, closed by the processor)",
            ["cause"],
            registry=r,
        )
        for cause in ("unavailable", "silent"):
            self.stream_reconnects.labels(cause=cause)
        self.storage_retries = Counter(
            "mini_scan_storage_retries", "Transient database errors retried", registry=r
        )
        self.database_timeouts = Counter(
            "mini_scan_database_timeouts",
            "Database calls left unanswered past DATABASE_TIMEOUT, then ended and retried",
            registry=r,
        )
        self.storage_refusals = Counter(
            "mini_scan_storage_refusals",
            "Batches with rows the database refused, by cause: row (those rows dead-lettered) "
            "or table (a known-good row or most rows refused too: retried as an outage)",
            ["cause"],
            registry=r,
        )
        for cause in ("row", "table"):  # exported at 0 from the start, so increase() sees the first
            self.storage_refusals.labels(cause=cause)
        self.batch_size = Histogram(
            "mini_scan_batch_size",
            "Messages per committed batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000),
            registry=r,
        )
        self.commit_seconds = Histogram(
            "mini_scan_commit_seconds",
            "Time to write and commit a batch",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.lag_seconds = BatchHistogram(
            "mini_scan_publish_to_commit_seconds",
            "From a message's publish time to the commit of its row",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 900),
            registry=r,
        )
        self.held = Gauge("mini_scan_messages_held", "Messages waiting for a commit", registry=r)
        self.database_up = Gauge("mini_scan_database_up", "1 if the last write worked", registry=r)
        self.streams_paused = Gauge(
            "mini_scan_streams_paused",
            "1 while the streams are closed because messages waited MAX_LEASE_SECONDS",
            registry=r,
        )
        self.ready = Gauge(
            "mini_scan_ready", "1 when streams are open and the database up", registry=r
        )
        self.consumer = Gauge(
            "mini_scan_consumer_info",
            "1 for the consumer that delivers this processor's messages (batch or client)",
            ["consumer"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def parse_samples(text: str) -> dict[str, float]:
    """The samples of a Prometheus text exposition, keyed as written: `name` or
    `name{label="value"}`."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def scrape(port: int, host: str = "127.0.0.1", timeout: float = 2.0) -> dict[str, float]:
    """A processor's /metrics on this machine, parsed; {} when nothing answers."""
    try:
        url = f"http://{host}:{port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return parse_samples(response.read().decode())
    except OSError:
        return {}
