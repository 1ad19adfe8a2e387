"""Scan messages on the wire, built by hand (not through `schema.encode`) so that tests check the
real format; and the catalogue of bad inputs, each with the reason it must be rejected for."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from processor.schema import MAX_JSON_TOKENS, Reason

NOW = int(time.time())


def scan(
    ip: str,
    port: int,
    service: str,
    timestamp: int,
    response: str,
    version: int = 2,
    *,
    ascii_only: bool = True,
) -> bytes:
    """A v1 (base64) or v2 (string) scan message; `ascii_only=False` keeps non-ASCII text raw
    (JSON escapes would triple astral text). Lone surrogates pass through, as a hostile
    publisher could send them."""
    if version == 1:
        data = {"response_bytes_utf8": base64.b64encode(response.encode()).decode()}
    else:
        data = {"response_str": response}
    message = {
        "ip": ip,
        "port": port,
        "service": service,
        "timestamp": timestamp,
        "data_version": version,
        "data": data,
    }
    return json.dumps(message, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


# The catalogue is decoded (and published, in test_processor) with this MAX_MESSAGE_BYTES: the
# default is Pub/Sub's own limit, which no publishable message exceeds.
CATALOGUE_MAX_BYTES = 100_000


def scan_message(**overrides: Any) -> dict[str, Any]:
    """A v2 scan message as a dict, with `overrides` applied."""
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


def scan_json(**overrides: Any) -> bytes:
    """`scan_message` as JSON bytes."""
    return json.dumps(scan_message(**overrides)).encode()


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
    ("unknown data_version", scan_json(data_version=3), Reason.UNSUPPORTED_VERSION),
    ("data_version as string", scan_json(data_version="2"), Reason.UNSUPPORTED_VERSION),
    (
        "missing ip",
        json.dumps({k: v for k, v in scan_message().items() if k != "ip"}).encode(),
        Reason.INVALID_SCHEMA,
    ),
    (
        "missing timestamp",
        json.dumps({k: v for k, v in scan_message().items() if k != "timestamp"}).encode(),
        Reason.INVALID_SCHEMA,
    ),
    (
        "missing data",
        json.dumps({k: v for k, v in scan_message().items() if k != "data"}).encode(),
        Reason.INVALID_DATA,
    ),
    ("data not an object", scan_json(data="hello"), Reason.INVALID_DATA),
    ("v2 data with v1 field", scan_json(data={"response_bytes_utf8": "aGk="}), Reason.INVALID_DATA),
    ("v2 response not a string", scan_json(data={"response_str": 42}), Reason.INVALID_DATA),
    (
        "v1 response null",
        scan_json(data_version=1, data={"response_bytes_utf8": None}),
        Reason.INVALID_DATA,
    ),
    (
        "v1 not base64",
        scan_json(data_version=1, data={"response_bytes_utf8": "not base64!"}),
        Reason.INVALID_BASE64,
    ),
    (
        "v1 unpadded base64",
        scan_json(data_version=1, data={"response_bytes_utf8": "aGk"}),
        Reason.INVALID_BASE64,
    ),
    (
        "v1 url-safe base64",
        scan_json(data_version=1, data={"response_bytes_utf8": "-_-_"}),
        Reason.INVALID_BASE64,
    ),
    (
        "v1 invalid utf-8",
        scan_json(data_version=1, data={"response_bytes_utf8": _b64(b"\xc3\x28")}),
        Reason.INVALID_UTF8,
    ),
    (
        "v1 lone surrogate",
        scan_json(data_version=1, data={"response_bytes_utf8": _b64(b"\xed\xa0\x80")}),
        Reason.INVALID_UTF8,
    ),
    ("ip not an address", scan_json(ip="example.com"), Reason.INVALID_IP),
    ("ip octet too large", scan_json(ip="1.1.1.256"), Reason.INVALID_IP),
    ("ip with leading zero", scan_json(ip="01.1.1.1"), Reason.INVALID_IP),
    ("ip as integer", scan_json(ip=16843009), Reason.INVALID_IP),
    ("ip with zone id", scan_json(ip="fe80::1%eth0"), Reason.INVALID_IP),
    ("port negative", scan_json(port=-1), Reason.INVALID_PORT),
    ("port too large", scan_json(port=65536), Reason.INVALID_PORT),
    ("port as string", scan_json(port="80"), Reason.INVALID_PORT),
    ("port as float", scan_json(port=80.0), Reason.INVALID_PORT),
    ("port as boolean", scan_json(port=True), Reason.INVALID_PORT),
    ("service empty", scan_json(service=""), Reason.INVALID_SERVICE),
    ("service blank", scan_json(service="   "), Reason.INVALID_SERVICE),
    ("service too long", scan_json(service="X" * 65), Reason.INVALID_SERVICE),
    ("service with control character", scan_json(service="HT\x00TP"), Reason.INVALID_SERVICE),
    ("service as number", scan_json(service=22), Reason.INVALID_SERVICE),
    ("timestamp as string", scan_json(timestamp="1750000000"), Reason.INVALID_TIMESTAMP),
    ("timestamp as float", scan_json(timestamp=1750000000.5), Reason.INVALID_TIMESTAMP),
    ("timestamp negative", scan_json(timestamp=-1), Reason.TIMESTAMP_OUT_OF_RANGE),
    (
        "timestamp far future",
        scan_json(timestamp=NOW + 10 * 365 * 86400),
        Reason.TIMESTAMP_OUT_OF_RANGE,
    ),
    ("ip with a NUL", scan_json(ip="1.1.1.1\x00"), Reason.INVALID_IP),
    ("ip with a NUL zone id", scan_json(ip="fe80::1%\x00"), Reason.INVALID_IP),
    ("message too large", scan_json() + b" " * CATALOGUE_MAX_BYTES, Reason.MESSAGE_TOO_LARGE),
    ("array too wide", scan_json(extra=[0] * MAX_JSON_TOKENS), Reason.MESSAGE_TOO_COMPLEX),
    (
        "too many keys",
        scan_json(extra={f"k{i}": None for i in range(MAX_JSON_TOKENS // 2)}),
        Reason.MESSAGE_TOO_COMPLEX,
    ),
    ("nested too deep", scan_json(extra=_nested(250)), Reason.MESSAGE_TOO_COMPLEX),
]
