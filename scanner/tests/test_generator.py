"""The generator: the reference scanner's distribution, reproducible, with the irregular kinds."""

from __future__ import annotations

import base64
import json
import re
from collections import Counter

import pytest

from processor.schema import Observation, Rejection, decode
from scanner.generator import Kind, Mix, ScanGenerator
from scanner.malformed import MALFORMED_REASONS

NOW = 1_700_000_000


def draw(count: int, **options: object) -> list:
    generator = ScanGenerator(lambda: NOW, **options)  # type: ignore[arg-type]
    return [generator.next() for _ in range(count)]


def test_messages_decode_and_follow_the_reference_distribution() -> None:
    messages = draw(20_000, seed=7)
    observations = [decode(m.data, now=NOW) for m in messages]

    assert observations == [m.observation for m in messages]
    assert {o.ip for o in observations} <= {f"1.1.1.{i}" for i in range(255)}
    assert len({o.ip for o in observations}) == 255  # 1.1.1.0 .. 1.1.1.254, all drawn
    assert all(0 <= o.port <= 65534 for o in observations)
    assert {o.service for o in observations} == {"HTTP", "SSH", "DNS"}
    numbers = [int(re.fullmatch(r"service response: (\d+)", o.response)[1]) for o in observations]
    assert min(numbers) == 0
    assert max(numbers) == 99
    assert all(o.timestamp == NOW for o in observations)


def test_versions_are_half_v1_base64_and_half_v2_string() -> None:
    bodies = [json.loads(m.data) for m in draw(20_000, seed=3)]
    versions = Counter(body["data_version"] for body in bodies)

    assert set(versions) == {1, 2}
    assert 0.48 < versions[1] / len(bodies) < 0.52
    for body in bodies[:200]:
        if body["data_version"] == 1:
            text = base64.b64decode(body["data"]["response_bytes_utf8"]).decode()
        else:
            text = body["data"]["response_str"]
        assert text.startswith("service response: ")


def test_the_same_seed_gives_the_same_messages_whatever_the_clock() -> None:
    mix = Mix(duplicates=0.1, out_of_order=0.1, malformed=0.1)
    first = ScanGenerator(lambda: NOW, seed=42, keys=50, mix=mix)
    later = ScanGenerator(lambda: NOW + 3600, seed=42, keys=50, mix=mix)

    for _ in range(2000):
        a, b = first.next(), later.next()
        assert (a.kind, a.reason, a.data_version) == (b.kind, b.reason, b.data_version)
        if a.observation is not None:
            assert a.observation.timestamp + 3600 == b.observation.timestamp
            assert a.observation._replace(timestamp=0) == b.observation._replace(timestamp=0)


def test_a_pinned_clock_and_seed_reproduce_every_byte() -> None:
    mix = Mix(duplicates=0.2, out_of_order=0.2, malformed=0.2)
    assert [m.data for m in draw(1000, seed=5, mix=mix)] == [
        m.data for m in draw(1000, seed=5, mix=mix)
    ]
    assert [m.data for m in draw(50, seed=5)] != [m.data for m in draw(50, seed=6)]


def test_a_fixed_key_set_makes_later_scans_update_earlier_keys() -> None:
    keys = Counter(m.observation.key for m in draw(5000, seed=1, keys=20))

    assert len(keys) == 20
    assert min(keys.values()) > 100


def test_duplicates_repeat_an_earlier_message_byte_for_byte() -> None:
    messages = draw(3000, seed=2, mix=Mix(duplicates=0.3))
    duplicates = [m for m in messages if m.kind is Kind.DUPLICATE]

    assert 0.25 < len(duplicates) / len(messages) < 0.35
    for duplicate in duplicates:
        original = messages[duplicate.duplicate_of]
        assert original.seq < duplicate.seq
        assert original.data == duplicate.data


def test_out_of_order_scans_are_older_than_now_some_by_hours() -> None:
    messages = draw(5000, seed=4, mix=Mix(out_of_order=0.5))
    lags = [NOW - m.observation.timestamp for m in messages if m.kind is Kind.OUT_OF_ORDER]

    assert all(1 <= lag <= 86_400 for lag in lags)
    assert max(lags) > 3600
    assert min(lags) < 300
    assert all(m.observation.timestamp == NOW for m in messages if m.kind is Kind.VALID)


def test_malformed_messages_cycle_through_every_rejection_reason() -> None:
    messages = [m for m in draw(3000, seed=9, mix=Mix(malformed=0.5)) if m.kind is Kind.MALFORMED]

    assert [m.reason for m in messages[: len(MALFORMED_REASONS)]] == list(MALFORMED_REASONS)
    for message in messages:
        with pytest.raises(Rejection) as rejected:
            decode(message.data, now=NOW)
        assert rejected.value.reason == message.reason


def test_the_log_record_carries_the_observation_or_the_expected_reason() -> None:
    valid = draw(1, seed=1)[0]
    malformed = draw(1, seed=1, mix=Mix(malformed=1.0))[0]

    record = valid.record("17")
    assert Observation(*(record[f] for f in Observation._fields)) == valid.observation
    assert record["message_id"] == "17"
    assert record["kind"] == "valid"
    assert malformed.record("18") == {
        "message_id": "18",
        "seq": 0,
        "kind": "malformed",
        "reason": "invalid_json",
    }
