"""The deployment files (deploy/) agree with the code they deploy and monitor."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from processor.observability import Metrics


def exported_sample_names() -> set[str]:
    """Every sample name a fresh processor's /metrics serves (histograms with their suffixes)."""
    families = text_string_to_metric_families(Metrics().render().decode())
    return {sample.name for family in families for sample in family.samples}


def test_the_processor_exports_its_start_time_so_restarts_can_be_alerted_on():
    assert "process_start_time_seconds" in exported_sample_names()
