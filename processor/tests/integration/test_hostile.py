"""Hostile input: arbitrary bytes and JSON never get past `decode` as anything but an
`Observation` or a `Rejection` with a documented reason; every string the decoder admits is
stored exactly as decoded on SQLite and PostgreSQL alike (NUL normalised to U+FFFD), so the same
messages end in the same table and the same dead letters on both, whatever their order and
batching; and a batch mixing such values with good ones never stalls the pipeline.
"""

from __future__ import annotations

import base64
import itertools
import json
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from emulator.testing import free_port, wait_until
from processor.pipeline.refusals import is_refused_value
from processor.schema import (
    MAX_JSON_TOKENS,
    MAX_SERVICE_LENGTH,
    Observation,
    Reason,
    Rejection,
    decode,
)
from processor.storage import Repository, migrate, open_engine
from processor.tests.helpers.chaos import STORAGE_REJECTED, pull_dead_letters, reasons_by_source
from processor.tests.helpers.oracle import expected_rows, stored_rows
from processor.tests.helpers.pipeline import Pipeline, metric
from processor.tests.helpers.wire import scan

NOW = int(time.time())
DECODER_REASONS = {str(reason) for reason in Reason} - {STORAGE_REJECTED}
# Under the 10 MB Pub/Sub limit with room for the rest of the message and its JSON framing.
NEAR_LIMIT = 9 * 1024 * 1024
# A few hundred examples in all: the file must stay well under a minute.
FAST = settings(max_examples=150, deadline=None)
WITH_DATABASES = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _base64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


# Every code point, surrogates included: JSON can carry a lone surrogate as an escape.
any_character = st.characters(codec=None, exclude_categories=())
any_text = st.text(any_character, max_size=200)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4)
    ),
    max_leaves=20,
)
integers = st.integers(min_value=-(2**70), max_value=2**70)
message_shaped = st.fixed_dictionaries(
    {},
    optional={
        "ip": st.one_of(st.ip_addresses().map(str), json_values),
        "port": st.one_of(integers, json_values),
        "service": st.one_of(any_text, json_values),
        "timestamp": st.one_of(integers, json_values),
        "data_version": st.one_of(st.sampled_from([1, 2]), json_values),
        "data": st.one_of(
            st.fixed_dictionaries({"response_str": any_text}),
            st.fixed_dictionaries({"response_bytes_utf8": st.binary().map(_base64)}),
            json_values,
        ),
    },
)


def assert_decoded_or_rejected(raw: bytes) -> Observation | None:
    """`decode` returns an Observation or raises a Rejection with a documented reason."""
    try:
        return decode(raw)
    except Rejection as rejection:
        reason = str(rejection.reason)
    assert reason in DECODER_REASONS
    return None


@FAST
@given(st.binary(max_size=2000))
@example(b"")
@example(b"\xff\xfe{}")
@example(b"{" * 10_000)
def test_arbitrary_bytes_decode_or_are_rejected_with_a_documented_reason(raw: bytes) -> None:
    assert_decoded_or_rejected(raw)


@FAST
@given(json_values, st.booleans())
def test_arbitrary_json_decodes_or_is_rejected_with_a_documented_reason(
    value: Any, ascii_only: bool
) -> None:
    try:
        raw = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    except ValueError:  # deeply nested beyond the json module's own limit: not an example
        assume(False)
    assert_decoded_or_rejected(raw)


@FAST
@given(message_shaped, st.booleans())
def test_message_shaped_json_with_arbitrary_fields_decodes_or_is_rejected(
    message: dict[str, Any], ascii_only: bool
) -> None:
    raw = json.dumps(message, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    observation = assert_decoded_or_rejected(raw)
    if observation is not None:  # what decode accepts is what the message said
        assert observation.port == message["port"]
        assert observation.timestamp == message["timestamp"]


# --- storage ----------------------------------------------------------------------------------

_ports = itertools.count(1)


@pytest.fixture
def repositories(sqlite_url: str, postgres_url: str) -> Iterator[list[Repository]]:
    """A migrated SQLite and PostgreSQL database, side by side."""
    made = []
    for url in (sqlite_url, postgres_url):
        engine = open_engine(url)
        migrate(engine)
        made.append(Repository(engine))
    yield made
    for repo in made:
        repo.engine.dispose()


def stored_exactly(repo: Repository, observation: Observation) -> None:
    """Store one observation and read it back unchanged; a refusal fails the test."""
    dialect = repo.engine.dialect.name
    repo.upsert_many([observation])
    [row] = [r for r in repo.rows() if (r.ip, r.port, r.service) == observation.key]
    assert (row.response, int(row.last_scanned.timestamp())) == (
        observation.response,
        observation.timestamp,
    ), f"{dialect} altered the value"


def wire(response: str, service: str = "HTTP", ascii_only: bool = True) -> bytes:
    """A v2 message carrying `response` on a key of its own."""
    port = next(_ports) % 65536
    return scan("10.0.0.1", port, service, NOW, response, ascii_only=ascii_only)


def json_tokens(value: Any) -> int:
    """The brackets, braces, commas and colons `json.dumps(value)` writes outside strings."""
    if isinstance(value, list):
        return 1 + max(len(value) - 1, 0) + sum(map(json_tokens, value))
    if isinstance(value, dict):
        return 1 + 2 * len(value) - (len(value) > 0) + sum(map(json_tokens, value.values()))
    return 0


@settings(max_examples=100, deadline=None)
@given(json_values, st.integers(min_value=-2, max_value=2), st.booleans())
@example(["ends in a backslash\\", "b"], 2, True)
@example({'\\"{:': ['\\\\"', '"\\,']}, 0, False)
def test_the_structure_limit_counts_exactly_what_lies_outside_strings(
    value: Any, delta: int, ascii_only: bool
) -> None:
    # Given a message whose extra field repeats a random JSON value (strings full of quotes,
    # backslashes, brackets and commas) until the message holds about MAX_JSON_TOKENS tokens
    message = json.loads(wire("x")) | {"extra": []}
    copies = (MAX_JSON_TOKENS - json_tokens(message)) // (json_tokens(value) + 1) + delta
    message["extra"] = [value] * max(copies, 1)
    raw = json.dumps(message, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    # When it is decoded
    try:
        decode(raw)
        reason = None
    except Rejection as rejection:
        reason = rejection.reason
    # Then it is too complex exactly when it holds more tokens than the limit
    too_complex = json_tokens(message) > MAX_JSON_TOKENS
    assert (reason == Reason.MESSAGE_TOO_COMPLEX) == too_complex, (json_tokens(message), reason)


@pytest.mark.postgres
@WITH_DATABASES
@given(
    response=any_text | any_text.map(lambda text: f"{text}\x00{text}"),
    service=st.sampled_from(["HTTP", "ssh"]) | st.text(st.characters(codec=None), max_size=70),
    ascii_only=st.booleans(),
)
@example(response="nul \x00 inside", service="HTTP", ascii_only=True)
@example(response="\U0001f600\U000e0001 astral", service="\U0001f600", ascii_only=False)
@example(response='\\"\b\f\n\r\t\u2028\u2029 escapes', service="HTTP", ascii_only=True)
@example(response="x", service="\u00df" * 64, ascii_only=False)  # upper() doubles its length
def test_every_admitted_string_is_stored_exactly_as_decoded_on_both_databases(
    repositories: list[Repository], response: str, service: str, ascii_only: bool
) -> None:
    observation = assert_decoded_or_rejected(wire(response, service, ascii_only))
    if observation is None:
        event("rejected by the decoder")
        return
    # The decoder alters nothing it admits but NUL, which no supported database refuses then
    assert observation.response == response.replace("\x00", "\ufffd")
    assert len(observation.service) <= MAX_SERVICE_LENGTH  # what is admitted fits the column
    for repo in repositories:
        stored_exactly(repo, observation)


@pytest.mark.postgres
def test_a_response_near_the_10_mb_message_limit_round_trips_on_both_databases(
    repositories: list[Repository],
) -> None:
    response = ("9 MB \U0001f600 \x01 " * (NEAR_LIMIT // 16))[: NEAR_LIMIT // 2]
    raw = wire(response, ascii_only=False)
    assert 8 * 1024 * 1024 < len(raw) < 10 * 1024 * 1024
    observation = decode(raw)
    assert observation.response == response
    for repo in repositories:
        stored_exactly(repo, observation)


# --- one table, whatever the database and the batching ------------------------------------------

SAME_KEYS = [("10.0.0.1", 80, "HTTP"), ("10.0.0.1", 22, "SSH"), ("::1", 53, "DNS")]


def _scan_body(key: tuple[str, int, str], timestamp: int, response: str, version: int) -> bytes:
    data: dict[str, str]
    if version == 1:
        data = {"response_bytes_utf8": _base64(response.encode("utf-8", "surrogatepass"))}
    else:
        data = {"response_str": response}
    message = {"ip": key[0], "port": key[1], "service": key[2], "timestamp": timestamp}
    message |= {"data_version": version, "data": data}
    return json.dumps(message).encode()


# Few keys, timestamps and responses: many merges and ties. NUL and U+FFFD collide once
# normalised; a lone surrogate is a rejection; message-shaped JSON brings the other reasons.
scan_bodies = st.builds(
    _scan_body,
    st.sampled_from(SAME_KEYS),
    st.integers(min_value=NOW - 3, max_value=NOW),
    st.sampled_from(["", "a", "a\x00", "a\ufffd", "\x00", "b\x00c", "\ud800"]) | any_text,
    st.sampled_from([1, 2]),
)
bodies = st.lists(
    scan_bodies | message_shaped.map(lambda m: json.dumps(m).encode("utf-8", "surrogatepass")),
    min_size=1,
    max_size=25,
)


def deliver(repo: Repository, bodies: list[bytes], rng: random.Random) -> dict[int, str]:
    """Deliver the messages as the processor would, with duplicates, in a random order and
    random batches: decode each, upsert each batch. Returns the dead letters (message index ->
    reason): the decoder's rejections, and every message of a batch the database refused
    (the writer would split it, but whichever way, its dead letters would then depend on the
    batching)."""
    deliveries = list(enumerate(bodies)) + rng.sample(list(enumerate(bodies)), len(bodies) // 2)
    rng.shuffle(deliveries)
    cuts = sorted(rng.sample(range(1, len(deliveries)), min(3, len(deliveries) - 1)))
    dead: dict[int, str] = {}
    for start, end in zip([0, *cuts], [*cuts, len(deliveries)], strict=True):
        batch = []
        for index, body in deliveries[start:end]:
            try:
                batch.append((index, decode(body)))
            except Rejection as rejection:
                dead[index] = str(rejection.reason)
        try:
            repo.upsert_many(observation for _, observation in batch)
        except Exception as exc:
            if not is_refused_value(exc):
                raise
            dead |= dict.fromkeys((index for index, _ in batch), STORAGE_REJECTED)
    return dead


@pytest.mark.postgres
@WITH_DATABASES
@given(bodies=bodies, seed=st.integers(0, 2**32))
@example(bodies=[_scan_body(SAME_KEYS[0], NOW, "a\x00", 2)], seed=0)
@example(
    bodies=[_scan_body(SAME_KEYS[0], NOW - 1, "nul \x00", 1), _scan_body(SAME_KEYS[0], NOW, "", 2)],
    seed=1,
)
def test_the_same_messages_end_in_the_same_table_and_dead_letters_on_both_databases(
    repositories: list[Repository], bodies: list[bytes], seed: int
) -> None:
    # Given the same messages, each database receiving them in its own order and batches
    for repo in repositories:
        with repo.engine.begin() as connection:
            connection.exec_driver_sql("DELETE FROM services")
    # When each database stores them
    dead = [deliver(repo, bodies, random.Random(seed + i)) for i, repo in enumerate(repositories)]
    # Then the dead letters are the decoder's rejections, on both
    decoded = {
        index: observation
        for index, body in enumerate(bodies)
        if (observation := assert_decoded_or_rejected(body)) is not None
    }
    assert dead[0] == dead[1]
    assert set(dead[0]) == set(range(len(bodies))) - set(decoded)
    # And the tables are both the merge rule's, over what was decoded
    expected = expected_rows(decoded.values())
    assert [stored_rows(repo.rows()) for repo in repositories] == [expected, expected]


# --- end to end -------------------------------------------------------------------------------

HOSTILE = {
    "nul": "a \x00 NUL",
    "controls": "".join(map(chr, range(1, 32))) + "\x7f\x85",
    "astral": "\U0001f600\U00010348\U000e007f\U0010ffff",
    "escapes": '\\"/\b\f\n\r\t\u2028\u2029',
    "bom": "\ufeff\ufffe\uffff",
    "near_limit": "\U0001f600" * (NEAR_LIMIT // 4 - 64),
}


def body(ip: str, port: int, service: str, response: str) -> bytes:
    """A v2 message as raw UTF-8 (the compact form: JSON escapes would triple astral text)."""
    return scan(ip, port, service, NOW, response, ascii_only=False)


def test_a_batch_mixing_hostile_values_with_good_ones_neither_crashes_nor_stalls(
    emulator_host: str, any_database_url: str, make_pipeline: Callable[..., Pipeline]
) -> None:
    # Given one batch-full of good scans with every hostile value among them, each on a key of
    # its own, a lone surrogate (JSON admits it, the decoder refuses it) and a service that
    # outgrows its column once upper-cased
    port = free_port()
    pipeline = make_pipeline(
        database_url=any_database_url, metrics_port=port, batch_max_wait_ms=500
    )
    good = {f"good-{i}": scan("1.1.1.1", i, "HTTP", NOW - i, f"response {i}") for i in range(40)}
    hostile = {
        label: body("2.2.2.2", i, "HTTP", value) for i, (label, value) in enumerate(HOSTILE.items())
    }
    hostile["lone_surrogate"] = scan("2.2.2.2", 100, "HTTP", NOW, "\ud800")
    hostile["long_service"] = body("2.2.2.2", 101, "\u00df" * 64, "x")
    bodies = list(good.items())[:20] + list(hostile.items()) + list(good.items())[20:]
    ids = {label: pipeline.publish([body], case=label)[0] for label, body in bodies}
    # When the processor takes them in
    stop = pipeline.start_processor()
    # Then every good scan is stored and every hostile one is stored exactly or dead-lettered
    # with a reason, and the pipeline goes on (all of them acked)
    total = len(good) + len(hostile)
    assert wait_until(
        lambda: metric(port, "mini_scan_messages_acked_total") >= total, timeout=60
    ), "the pipeline stalled"
    rows = {(r.ip, r.port): r for r in pipeline.rows()}
    assert all(rows[("1.1.1.1", i)].response == f"response {i}" for i in range(40))
    letters = reasons_by_source(
        pull_dead_letters(
            pipeline.settings.dead_letter_subscription_path, lambda _: False, timeout=2, settle=0
        )
    )
    outcome = {}
    for label, raw in hostile.items():
        message = json.loads(raw)
        row = rows.get((message["ip"], message["port"]))
        if row is not None:
            assert row.response == message["data"]["response_str"].replace("\x00", "\ufffd")
            outcome[label] = "stored"
        else:
            [reason] = letters[ids[label]]
            outcome[label] = reason
    # On both databases alike: the lone surrogate and the long service are the decoder's
    # rejections, and everything else is stored (NUL as U+FFFD)
    assert outcome == dict.fromkeys(HOSTILE, "stored") | {
        "lone_surrogate": "invalid_json",
        "long_service": "invalid_service",
    }
    assert all(ids[label] not in letters for label in good), "a good scan was dead-lettered"
    print(outcome)
    assert stop() == 0
