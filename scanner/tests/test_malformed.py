"""Each malformed-body generator earns exactly its rejection reason from the decoder."""

from __future__ import annotations

import random

import pytest

from processor.schema import Reason, Rejection, decode
from scanner.malformed import MALFORMED, MALFORMED_REASONS

NOW = 1_700_000_000


def test_there_is_a_generator_for_every_decoder_reason_pubsub_can_carry() -> None:
    # message_too_large would exceed Pub/Sub's own limit at the default MAX_MESSAGE_BYTES.
    unpublishable = {Reason.STORAGE_REJECTED, Reason.MESSAGE_TOO_LARGE}
    assert set(MALFORMED_REASONS) == set(Reason) - unpublishable


@pytest.mark.parametrize("reason", MALFORMED_REASONS, ids=str)
def test_the_decoder_rejects_the_body_with_exactly_that_reason(reason: Reason) -> None:
    rng = random.Random(reason)
    for _ in range(200):
        body = MALFORMED[reason](rng, NOW)
        with pytest.raises(Rejection) as rejected:
            decode(body, now=NOW)
        assert rejected.value.reason == reason, body
