"""The README is the user's contract: every setting and every rejection reason is documented."""

from __future__ import annotations

import pytest

from processor.config import ProcessorSettings, SetupSettings
from processor.schema import Reason
from processor.tests.helpers import ROOT

README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize(
    "name", sorted(set(ProcessorSettings.model_fields) | set(SetupSettings.model_fields))
)
def test_every_setting_is_in_the_readme_table(name: str):
    row = f"| `{name.upper()}` | `--{name.replace('_', '-')}` |"

    assert row in README


@pytest.mark.parametrize("reason", [r.value for r in Reason])
def test_every_rejection_reason_is_in_the_readme_table(reason: str):
    assert f"| `{reason}` |" in README


def test_the_readme_gives_the_run_and_test_commands():
    assert "\n    uv run --no-dev mini-scan up\n" in README
    assert "\n    uv run pytest\n" in README
