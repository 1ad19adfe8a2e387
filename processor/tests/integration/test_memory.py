"""Memory is bounded by what flow control counts: a delivered message keeps nothing of its
streaming-pull response but its own copy, even while its dead letter waits on a slow publish."""

from __future__ import annotations

import signal
from collections.abc import Callable

from emulator.faults import Faults
from emulator.testing import wait_until
from processor.pipeline.deadletter import MAX_BYTES_IN_FLIGHT
from processor.schema import Observation, Reason
from processor.tests.helpers.chaos import (
    covers,
    describe_difference,
    pull_dead_letters,
    reaches,
    unexpected_letters,
)
from processor.tests.helpers.oracle import expected_rows
from processor.tests.helpers.pipeline import NOW, Pipeline, ProcessorProcess, metric
from processor.tests.helpers.wire import scan

STREAMS = 2
MAX_BYTES = 4 * 1024 * 1024  # per stream: about 20 of the large messages below
RESPONSE_BYTES = 200_000
VALID = 1500
INVALID_EVERY = 20  # one invalid message among 19 large valid ones: about one a response
DEAD_LETTER_DELAY = 15.0  # each Publish to the dead-letter topic is held this long
MB = 1024 * 1024
# What the bound leaves for what is not a message: gRPC's receive buffers, the publisher's
# batches, the allocator's slack (measured: 20-35 MB above the idle peak without messages).
SLACK = 100 * MB
INVALID = b"{not json"


def memory_bound(idle_peak: int) -> int:
    """The documented bound (docs/reliability.md): the idle process, plus what flow control
    lets every stream hold counted twice (raw data and its decoded response), plus the
    dead-letter copies allowed in flight, plus slack."""
    return idle_peak + 2 * STREAMS * MAX_BYTES + MAX_BYTES_IN_FLIGHT + SLACK


def peak_rss(pid: int) -> int:
    """VmHWM: the process's peak resident set, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def test_memory_stays_within_flow_control_while_dead_letters_are_slow(
    emulator_host: str,
    faults: Faults,
    make_pipeline: Callable[..., Pipeline],
    spawn_processor: Callable[..., ProcessorProcess],
) -> None:
    """Catches a message that keeps its whole response alive (the attributes map as a view
    into it, or the client library's message object): each invalid message waiting for its
    dead letter's publish pins a response of up to MAX_BYTES, which flow control never sees,
    and the peak grows by about one response per response received."""
    # Given a processor whose dead-letter publishes are each held 15 s
    pipeline = make_pipeline()
    child = spawn_processor(
        pipeline, STREAMS=str(STREAMS), MAX_BYTES=str(MAX_BYTES), LOG_LEVEL="WARNING"
    )
    child.wait_ready(timeout=120)
    idle_peak = peak_rss(child.process.pid)
    valid = [
        Observation(f"10.0.{i // 256}.{i % 256}", 443, "HTTP", NOW, f"{i} " + "x" * RESPONSE_BYTES)
        for i in range(VALID)
    ]
    bodies: list[bytes] = []
    for i, o in enumerate(valid):
        if i % (INVALID_EVERY - 1) == 0:
            bodies.append(INVALID)
        bodies.append(scan(o.ip, o.port, o.service, o.timestamp, o.response))
    faults.fail_next(
        "Publish",
        n=bodies.count(INVALID),
        code=None,
        delay=DEAD_LETTER_DELAY,
        topic=pipeline.settings.dead_letter_topic_path,
    )
    # When large valid messages arrive with a rare invalid one among them, every message
    # carrying an attribute (a map the client parses into each response)
    ids = pipeline.publish(bodies, origin="memory-test")
    expected_letters = {
        message_id: str(Reason.INVALID_JSON)
        for message_id, body in zip(ids, bodies, strict=True)
        if body == INVALID
    }
    # Then every valid one is stored and every invalid one dead-lettered with its reason
    url = pipeline.settings.database_url
    expected = expected_rows(valid)
    assert reaches(url, expected, 180), describe_difference(url, expected)
    letters = pull_dead_letters(
        pipeline.settings.dead_letter_subscription_path, covers(expected_letters), timeout=60
    )
    assert unexpected_letters(letters, expected_letters) == {}
    acked = lambda: metric(child.metrics_port, "mini_scan_messages_acked_total")  # noqa: E731
    assert wait_until(lambda: acked() >= len(bodies), timeout=30)
    # And the peak resident set stayed within the bound flow control sets
    peak = peak_rss(child.process.pid)
    bound = memory_bound(idle_peak)
    print(f"peak {peak / MB:.0f} MB, idle {idle_peak / MB:.0f} MB, bound {bound / MB:.0f} MB")
    assert peak <= bound, f"peak {peak / MB:.0f} MB above the bound {bound / MB:.0f} MB"
    child.signal(signal.SIGTERM)
    assert child.wait(timeout=30) == 0, child.output()[-3000:]
