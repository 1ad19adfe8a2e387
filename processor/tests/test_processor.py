"""The processor end to end: real emulator, real client, real database."""

from __future__ import annotations

import time

from emulator.testing import wait_until
from processor.tests.conftest import scan

NOW = int(time.time())


def test_both_hello_world_forms_are_stored_as_text(any_emulator_host, make_pipeline):
    pipeline = make_pipeline()
    pipeline.publish(
        [
            scan("1.1.1.1", 80, "HTTP", NOW, "hello world", version=1),
            scan("1.1.1.2", 22, "SSH", NOW, "hello world", version=2),
        ]
    )

    stop = pipeline.start_processor()

    assert wait_until(lambda: len(pipeline.rows()) == 2, timeout=20)
    assert {row.response for row in pipeline.rows()} == {"hello world"}
    assert stop() == 0
