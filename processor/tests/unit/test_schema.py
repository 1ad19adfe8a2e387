"""The wire schema: what decodes, what is rejected, and with which reason."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from processor.schema import (
    MAX_JSON_TOKENS,
    MAX_TIMESTAMP,
    Observation,
    Reason,
    Rejection,
    decode,
    encode,
)

NOW = 1_750_000_000
# The catalogue is decoded (and published, in test_processor) with this MAX_MESSAGE_BYTES: the
# default is Pub/Sub's own limit, which no publishable message exceeds.
CATALOGUE_MAX_BYTES = 100_000


def message(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "ip": "1.1.1.1",
        "port": 80,
        "service": "HTTP",
        "timestamp": NOW,
        "data_version": 2,
        "data": {"response_str": "hello world"},
    }
    base.update(overrides)
    return base


def raw(**overrides: Any) -> bytes:
    return json.dumps(message(**overrides)).encode()


def test_both_hello_world_forms_decode_to_the_same_text():
    v1 = raw(data_version=1, data={"response_bytes_utf8": "aGVsbG8gd29ybGQ="})
    v2 = raw(data_version=2, data={"response_str": "hello world"})

    assert decode(v1, now=NOW).response == "hello world"
    assert decode(v2, now=NOW).response == "hello world"
    assert decode(v1, now=NOW) == decode(v2, now=NOW)


@pytest.mark.parametrize("version", [1, 2])
def test_encode_then_decode_round_trips(version: int):
    obs = Observation("2001:db8::1", 0, "SSH", NOW, "SSH-2.0-OpenSSH_9.6 ✓\n")

    assert decode(encode(obs, version), now=NOW) == obs


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
        ("2001:db8::0001", "2001:db8::1"),
        ("::ffff:1.2.3.4", "1.2.3.4"),
        ("8.8.8.8", "8.8.8.8"),
    ],
)
def test_two_spellings_of_one_address_are_one_key(spelling: str, canonical: str):
    assert decode(raw(ip=spelling), now=NOW).ip == canonical


def test_service_is_trimmed_and_upper_cased():
    assert decode(raw(service="  http "), now=NOW).service == "HTTP"


def test_port_zero_and_65535_are_legitimate():
    assert decode(raw(port=0), now=NOW).port == 0
    assert decode(raw(port=65535), now=NOW).port == 65535


def test_unknown_extra_fields_are_ignored():
    obs = decode(raw(scanner="v9", data={"response_str": "x", "encoding": "utf8"}), now=NOW)

    assert obs.response == "x"


def test_future_skew_is_configurable():
    two_hours_ahead = raw(timestamp=NOW + 7200)

    with pytest.raises(Rejection):
        decode(two_hours_ahead, now=NOW)
    assert decode(two_hours_ahead, now=NOW, max_skew=3 * 3600).timestamp == NOW + 7200


def test_a_timestamp_within_the_default_skew_is_accepted():
    assert decode(raw(timestamp=int(time.time()) + 60)).timestamp > 0


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


BAD_INPUTS: list[tuple[str, bytes, Reason]] = [
    ("not json", b"hello", Reason.INVALID_JSON),
    ("truncated json", b'{"ip": "1.1.1.1"', Reason.INVALID_JSON),
    ("not utf-8", b"\xff\xfe{}", Reason.INVALID_JSON),
    ("empty body", b"", Reason.INVALID_JSON),
    ("json array", b"[1, 2]", Reason.NOT_AN_OBJECT),
    ("json string", b'"hello"', Reason.NOT_AN_OBJECT),
    ("json null", b"null", Reason.NOT_AN_OBJECT),
    ("missing data_version", json.dumps({"ip": "1.1.1.1"}).encode(), Reason.INVALID_SCHEMA),
    ("unknown data_version", raw(data_version=3), Reason.UNSUPPORTED_VERSION),
    ("data_version as string", raw(data_version="2"), Reason.UNSUPPORTED_VERSION),
    (
        "missing ip",
        json.dumps({k: v for k, v in message().items() if k != "ip"}).encode(),
        Reason.INVALID_SCHEMA,
    ),
    (
        "missing timestamp",
        json.dumps({k: v for k, v in message().items() if k != "timestamp"}).encode(),
        Reason.INVALID_SCHEMA,
    ),
    (
        "missing data",
        json.dumps({k: v for k, v in message().items() if k != "data"}).encode(),
        Reason.INVALID_DATA,
    ),
    ("data not an object", raw(data="hello"), Reason.INVALID_DATA),
    ("v2 data with v1 field", raw(data={"response_bytes_utf8": "aGk="}), Reason.INVALID_DATA),
    ("v2 response not a string", raw(data={"response_str": 42}), Reason.INVALID_DATA),
    (
        "v1 response null",
        raw(data_version=1, data={"response_bytes_utf8": None}),
        Reason.INVALID_DATA,
    ),
    (
        "v1 not base64",
        raw(data_version=1, data={"response_bytes_utf8": "not base64!"}),
        Reason.INVALID_BASE64,
    ),
    (
        "v1 unpadded base64",
        raw(data_version=1, data={"response_bytes_utf8": "aGk"}),
        Reason.INVALID_BASE64,
    ),
    (
        "v1 url-safe base64",
        raw(data_version=1, data={"response_bytes_utf8": "-_-_"}),
        Reason.INVALID_BASE64,
    ),
    (
        "v1 invalid utf-8",
        raw(data_version=1, data={"response_bytes_utf8": _b64(b"\xc3\x28")}),
        Reason.INVALID_UTF8,
    ),
    (
        "v1 lone surrogate",
        raw(data_version=1, data={"response_bytes_utf8": _b64(b"\xed\xa0\x80")}),
        Reason.INVALID_UTF8,
    ),
    ("ip not an address", raw(ip="example.com"), Reason.INVALID_IP),
    ("ip octet too large", raw(ip="1.1.1.256"), Reason.INVALID_IP),
    ("ip with leading zero", raw(ip="01.1.1.1"), Reason.INVALID_IP),
    ("ip as integer", raw(ip=16843009), Reason.INVALID_IP),
    ("ip with zone id", raw(ip="fe80::1%eth0"), Reason.INVALID_IP),
    ("port negative", raw(port=-1), Reason.INVALID_PORT),
    ("port too large", raw(port=65536), Reason.INVALID_PORT),
    ("port as string", raw(port="80"), Reason.INVALID_PORT),
    ("port as float", raw(port=80.0), Reason.INVALID_PORT),
    ("port as boolean", raw(port=True), Reason.INVALID_PORT),
    ("service empty", raw(service=""), Reason.INVALID_SERVICE),
    ("service blank", raw(service="   "), Reason.INVALID_SERVICE),
    ("service too long", raw(service="X" * 65), Reason.INVALID_SERVICE),
    ("service with control character", raw(service="HT\x00TP"), Reason.INVALID_SERVICE),
    ("service as number", raw(service=22), Reason.INVALID_SERVICE),
    ("timestamp as string", raw(timestamp="1750000000"), Reason.INVALID_TIMESTAMP),
    ("timestamp as float", raw(timestamp=1750000000.5), Reason.INVALID_TIMESTAMP),
    ("timestamp negative", raw(timestamp=-1), Reason.TIMESTAMP_OUT_OF_RANGE),
    ("timestamp far future", raw(timestamp=NOW + 10 * 365 * 86400), Reason.TIMESTAMP_OUT_OF_RANGE),
    ("ip with a NUL", raw(ip="1.1.1.1\x00"), Reason.INVALID_IP),
    ("ip with a NUL zone id", raw(ip="fe80::1%\x00"), Reason.INVALID_IP),
    ("message too large", raw() + b" " * CATALOGUE_MAX_BYTES, Reason.MESSAGE_TOO_LARGE),
    ("array too wide", raw(extra=[0] * MAX_JSON_TOKENS), Reason.MESSAGE_TOO_COMPLEX),
    (
        "too many keys",
        raw(extra={f"k{i}": None for i in range(MAX_JSON_TOKENS // 2)}),
        Reason.MESSAGE_TOO_COMPLEX,
    ),
    ("nested too deep", raw(extra=_nested(250)), Reason.MESSAGE_TOO_COMPLEX),
]


@pytest.mark.parametrize(("label", "body", "reason"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_rejected_with_its_reason(label: str, body: bytes, reason: Reason):
    with pytest.raises(Rejection) as caught:
        decode(body, now=NOW, max_bytes=CATALOGUE_MAX_BYTES)

    assert caught.value.reason == reason, caught.value.message
    assert caught.value.message


def test_the_catalogue_covers_every_decoder_reason():
    covered = {reason for _, _, reason in BAD_INPUTS}

    assert covered == set(Reason) - {Reason.STORAGE_REJECTED}


@pytest.mark.parametrize("version", [1, 2])
def test_a_nul_in_the_response_is_stored_as_the_replacement_character(version: int):
    nul = Observation("1.1.1.1", 80, "HTTP", NOW, "\x00\x01 banner \x00\x00\ufffd")

    decoded = decode(encode(nul, version), now=NOW)

    assert decoded.response == "\ufffd\x01 banner \ufffd\ufffd\ufffd"
    assert decoded == nul._replace(response=decoded.response)


def test_a_timestamp_after_the_year_9999_is_out_of_range_whatever_the_skew():
    skew = 10**12

    assert decode(raw(timestamp=MAX_TIMESTAMP), now=NOW, max_skew=skew).timestamp == MAX_TIMESTAMP
    with pytest.raises(Rejection) as caught:
        decode(raw(timestamp=MAX_TIMESTAMP + 1), now=NOW, max_skew=skew)
    assert caught.value.reason == Reason.TIMESTAMP_OUT_OF_RANGE


def test_the_size_limit_admits_a_message_of_exactly_that_many_bytes():
    body = raw()

    assert decode(body, now=NOW, max_bytes=len(body)).port == 80
    with pytest.raises(Rejection) as caught:
        decode(body, now=NOW, max_bytes=len(body) - 1)
    assert caught.value.reason == Reason.MESSAGE_TOO_LARGE


def test_the_structure_limit_admits_exactly_max_json_tokens():
    # A scan message has 14 tokens; "extra" adds its colon, a comma, a bracket and n - 1 commas.
    at_limit = raw(extra=[0] * (MAX_JSON_TOKENS - 16))
    over = raw(extra=[0] * (MAX_JSON_TOKENS - 15))

    assert decode(at_limit, now=NOW).port == 80
    with pytest.raises(Rejection) as caught:
        decode(over, now=NOW)
    assert caught.value.reason == Reason.MESSAGE_TOO_COMPLEX


def test_brackets_commas_quotes_and_backslashes_inside_strings_are_not_structure():
    # Given a large response full of what would be structure outside a string, with escaped
    # quotes and backslashes that a naive scan would take for the string's end
    response = '\\",[{:' * (2 * MAX_JSON_TOKENS) + '\\\\"' * MAX_JSON_TOKENS
    body = raw(data={"response_str": response}, note='"[,]"')
    # Then it is an ordinary message
    assert decode(body, now=NOW).response == response
