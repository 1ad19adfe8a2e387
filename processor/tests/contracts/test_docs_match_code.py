"""The docs name only what exists: every metric, flag, alert and module path a manual names is in
the code, and every metric the processor exports is documented. A rename in the code without
its doc (or the other way round) fails here."""

from __future__ import annotations

import contextlib
import io
import re
from functools import cache

import pytest
import yaml

from processor.cli import COMMANDS, main
from processor.runtime.metrics import Metrics
from processor.tests.helpers import ROOT

USER_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "deploy/README.md"]
# The manuals an operator reads for what they type and what they watch.
OPERATOR_DOCS = [ROOT / "README.md", ROOT / "docs/operations.md"]
RULES = ROOT / "deploy/prometheus/rules/mini-scan.rules.yml"


def _text(paths: list) -> str:
    return "\n".join(path.read_text() for path in paths if path.exists())


@cache
def exported_metrics() -> set[str]:
    """Every family and sample name the processor's registry exports."""
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    # Counters are documented by their _total sample; prometheus_client names the family without.
    return names | {f"{name}_total" for name in names if f"{name}_total" not in names}


@cache
def command_flags() -> set[str]:
    """Every --flag of every `mini-scan` command, read from their --help."""
    flags: set[str] = set()
    invocations = [[name] for name in COMMANDS if name != "dlq"] + [
        ["dlq", "list"],
        ["dlq", "replay"],
    ]
    for argv in invocations:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main([*argv, "--help"])
        flags.update(re.findall(r"--[a-z][a-z0-9-]*", out.getvalue()))
    return flags


def test_every_metric_a_manual_names_is_exported() -> None:
    named = set(re.findall(r"\bmini_scan_[a-z_]+[a-z]", _text(USER_DOCS)))
    unknown = sorted(name for name in named if name not in exported_metrics())
    assert not unknown, f"documented but not exported: {unknown}"


def test_every_metric_the_processor_exports_is_documented_for_operators() -> None:
    families = {f.name for f in Metrics().registry.collect() if f.name.startswith("mini_scan_")}
    text = _text(OPERATOR_DOCS)
    missing = sorted(name for name in families if not re.search(rf"\b{name}(_total)?\b", text))
    assert not missing, f"exported but not in README/docs/operations.md: {missing}"


@pytest.mark.parametrize("doc", OPERATOR_DOCS, ids=lambda path: path.name)
def test_every_flag_an_operator_doc_names_exists(doc) -> None:
    spans = re.findall(r"`([^`\n]+)`", doc.read_text())
    named = {
        flag
        for span in spans
        if span.startswith(("mini-scan ", "--"))
        for flag in re.findall(r"(?<![\w.-])--[a-z][a-z0-9-]*(?![\w.])", span)
    }
    unknown = sorted(named - command_flags())
    assert not unknown, f"{doc.name} names flags no command has: {unknown}"


def test_every_alert_a_manual_names_is_a_rule_and_every_rule_is_in_the_alert_table() -> None:
    rules = yaml.safe_load(RULES.read_text())
    alerts = {
        rule["alert"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule
    }
    alert = r"\bMiniScan(?!Error\b)[A-Z][A-Za-z]+"
    named = set(re.findall(alert, _text(USER_DOCS)))
    assert named - alerts == set(), "documented alerts that are not rules"
    tabled = set(re.findall(alert, (ROOT / "deploy/README.md").read_text()))
    assert alerts - tabled == set(), "alert rules missing from deploy/README.md"


def test_every_module_path_a_manual_names_exists() -> None:
    named = set(
        re.findall(r"\b((?:processor|scanner|emulator|bench)/[\w/]+\.py)\b", _text(USER_DOCS))
    )
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert not missing, f"documented paths that do not exist: {missing}"


def _logged_events() -> set[str]:
    """Every event name the code logs (`_log.info("event", ...)` and the like)."""
    call = re.compile(
        r"\b_?\w*log\w*\.(?:debug|info|warning|error|critical|exception)\(\s*\"(\w+)\""
    )
    sources = [
        path
        for package in ("processor", "scanner", "emulator")
        for path in (ROOT / package).rglob("*.py")
        if "tests" not in path.parts
    ]
    return {event for path in sources for event in call.findall(path.read_text())}


def _documented_events() -> set[str]:
    """The events in the first column of operations.md's log table."""
    text = (ROOT / "docs/operations.md").read_text()
    table = text[
        text.index("| event | level |") : text.index("\n\n", text.index("| event | level |"))
    ]
    return {
        event
        for row in table.splitlines()[2:]
        for event in re.findall(r"`(\w+)`", row.split("|")[1])
    }


def test_every_log_event_is_documented_and_every_documented_event_is_logged() -> None:
    logged, documented = _logged_events(), _documented_events()
    assert logged - documented == set(), "logged but not in docs/operations.md"
    assert documented - logged == set(), "documented but never logged"
