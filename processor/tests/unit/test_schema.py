"""The wire schema: what decodes, what is rejected, and with which reason."""

from __future__ import annotations

import time

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
from processor.tests.helpers.wire import (
    BAD_INPUTS,
    CATALOGUE_MAX_BYTES,
    NOW,
    scan_json,
)


def test_both_hello_world_forms_decode_to_the_same_text():
    v1 = scan_json(data_version=1, data={"response_bytes_utf8": "aGVsbG8gd29ybGQ="})
    v2 = scan_json(data_version=2, data={"response_str": "hello world"})

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
    assert decode(scan_json(ip=spelling), now=NOW).ip == canonical


def test_service_is_trimmed_and_upper_cased():
    assert decode(scan_json(service="  http "), now=NOW).service == "HTTP"


def test_port_zero_and_65535_are_legitimate():
    assert decode(scan_json(port=0), now=NOW).port == 0
    assert decode(scan_json(port=65535), now=NOW).port == 65535


def test_unknown_extra_fields_are_ignored():
    obs = decode(scan_json(scanner="v9", data={"response_str": "x", "encoding": "utf8"}), now=NOW)

    assert obs.response == "x"


def test_future_skew_is_configurable():
    two_hours_ahead = scan_json(timestamp=NOW + 7200)

    with pytest.raises(Rejection):
        decode(two_hours_ahead, now=NOW)
    assert decode(two_hours_ahead, now=NOW, max_skew=3 * 3600).timestamp == NOW + 7200


def test_a_timestamp_within_the_default_skew_is_accepted():
    assert decode(scan_json(timestamp=int(time.time()) + 60)).timestamp > 0


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

    assert (
        decode(scan_json(timestamp=MAX_TIMESTAMP), now=NOW, max_skew=skew).timestamp
        == MAX_TIMESTAMP
    )
    with pytest.raises(Rejection) as caught:
        decode(scan_json(timestamp=MAX_TIMESTAMP + 1), now=NOW, max_skew=skew)
    assert caught.value.reason == Reason.TIMESTAMP_OUT_OF_RANGE


def test_the_size_limit_admits_a_message_of_exactly_that_many_bytes():
    body = scan_json()

    assert decode(body, now=NOW, max_bytes=len(body)).port == 80
    with pytest.raises(Rejection) as caught:
        decode(body, now=NOW, max_bytes=len(body) - 1)
    assert caught.value.reason == Reason.MESSAGE_TOO_LARGE


def test_the_structure_limit_admits_exactly_max_json_tokens():
    # A scan message has 14 tokens; "extra" adds its colon, a comma, a bracket and n - 1 commas.
    at_limit = scan_json(extra=[0] * (MAX_JSON_TOKENS - 16))
    over = scan_json(extra=[0] * (MAX_JSON_TOKENS - 15))

    assert decode(at_limit, now=NOW).port == 80
    with pytest.raises(Rejection) as caught:
        decode(over, now=NOW)
    assert caught.value.reason == Reason.MESSAGE_TOO_COMPLEX


def test_brackets_commas_quotes_and_backslashes_inside_strings_are_not_structure():
    # Given a large response full of what would be structure outside a string, with escaped
    # quotes and backslashes that a naive scan would take for the string's end
    response = '\\",[{:' * (2 * MAX_JSON_TOKENS) + '\\\\"' * MAX_JSON_TOKENS
    body = scan_json(data={"response_str": response}, note='"[,]"')
    # Then it is an ordinary message
    assert decode(body, now=NOW).response == response
