"""One generator of malformed message bodies per decoder rejection reason.

Each body is otherwise a valid v1 or v2 message, so the decoder rejects it for exactly that reason;
the processor's dead-letter path can then be checked reason by reason.

`message_too_large` has no generator: its body would have to exceed `MAX_MESSAGE_BYTES`, by default
Pub/Sub's own limit, which Pub/Sub refuses to publish. The decoder's tests cover it with a small
limit.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Callable
from typing import Any

from processor.schema import MAX_JSON_TOKENS, Reason

MalformedBody = Callable[[random.Random, int], bytes]


def _valid(rng: random.Random, now: int, version: int = 2) -> dict[str, Any]:
    response = f"service response: {rng.randrange(100)}"
    data: dict[str, str]
    if version == 1:
        data = {"response_bytes_utf8": base64.b64encode(response.encode()).decode("ascii")}
    else:
        data = {"response_str": response}
    return {
        "ip": f"1.1.1.{rng.randrange(255)}",
        "port": rng.randrange(65535),
        "service": rng.choice(("HTTP", "SSH", "DNS")),
        "timestamp": now,
        "data_version": version,
        "data": data,
    }


def _dump(message: object) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def _invalid_json(rng: random.Random, now: int) -> bytes:
    whole = _dump(_valid(rng, now))
    return whole[: rng.randrange(1, len(whole) - 1)]  # a truncated body, as a cut-off write


def _not_an_object(rng: random.Random, now: int) -> bytes:
    return _dump([_valid(rng, now)])


def _invalid_schema(rng: random.Random, now: int) -> bytes:
    message = _valid(rng, now)
    del message["port"]
    return _dump(message)


def _unsupported_version(rng: random.Random, now: int) -> bytes:
    return _dump({**_valid(rng, now), "data_version": rng.choice((0, 3, 99))})


def _invalid_data(rng: random.Random, now: int) -> bytes:
    # A v2 message carrying v1's field: the data does not match the declared version.
    return _dump({**_valid(rng, now, version=1), "data_version": 2})


def _invalid_base64(rng: random.Random, now: int) -> bytes:
    message = _valid(rng, now, version=1)
    message["data"] = {"response_bytes_utf8": "not base64!"}
    return _dump(message)


def _invalid_utf8(rng: random.Random, now: int) -> bytes:
    message = _valid(rng, now, version=1)
    latin1 = f"r\xe9ponse {rng.randrange(100)}".encode("latin-1")
    message["data"] = {"response_bytes_utf8": base64.b64encode(latin1).decode("ascii")}
    return _dump(message)


def _invalid_ip(rng: random.Random, now: int) -> bytes:
    return _dump({**_valid(rng, now), "ip": f"1.1.1.{rng.randrange(256, 1000)}"})


def _invalid_port(rng: random.Random, now: int) -> bytes:
    return _dump({**_valid(rng, now), "port": rng.choice((-1, 65536, 70000))})


def _invalid_service(rng: random.Random, now: int) -> bytes:
    return _dump({**_valid(rng, now), "service": rng.choice(("", "   ", "X" * 65))})


def _invalid_timestamp(rng: random.Random, now: int) -> bytes:
    return _dump({**_valid(rng, now), "timestamp": str(now)})


def _timestamp_out_of_range(rng: random.Random, now: int) -> bytes:
    # Negative rather than far-future: rejected whatever clock the decoder reads.
    return _dump({**_valid(rng, now), "timestamp": -rng.randrange(1, 86400)})


def _message_too_complex(rng: random.Random, now: int) -> bytes:
    # A newer scanner's extra field gone wrong: far too wide, too many keys, or too deep.
    wide = [rng.randrange(10) for _ in range(MAX_JSON_TOKENS + 1)]
    many_keys = {f"k{i}": i for i in range(MAX_JSON_TOKENS // 2 + 1)}
    deep: list[Any] = []
    for _ in range(rng.randrange(300, 400)):
        deep = [deep]
    extra = rng.choice((wide, many_keys, deep))
    return _dump({**_valid(rng, now), "extra": extra})


MALFORMED: dict[Reason, MalformedBody] = {
    Reason.INVALID_JSON: _invalid_json,
    Reason.NOT_AN_OBJECT: _not_an_object,
    Reason.INVALID_SCHEMA: _invalid_schema,
    Reason.UNSUPPORTED_VERSION: _unsupported_version,
    Reason.INVALID_DATA: _invalid_data,
    Reason.INVALID_BASE64: _invalid_base64,
    Reason.INVALID_UTF8: _invalid_utf8,
    Reason.INVALID_IP: _invalid_ip,
    Reason.INVALID_PORT: _invalid_port,
    Reason.INVALID_SERVICE: _invalid_service,
    Reason.INVALID_TIMESTAMP: _invalid_timestamp,
    Reason.TIMESTAMP_OUT_OF_RANGE: _timestamp_out_of_range,
    Reason.MESSAGE_TOO_COMPLEX: _message_too_complex,
}
# The decoder's reasons, in declaration order, but message_too_large (see above);
# storage_rejected is the processor's, not a body's.
MALFORMED_REASONS: tuple[Reason, ...] = tuple(MALFORMED)
