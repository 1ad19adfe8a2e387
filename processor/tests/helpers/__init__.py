"""Helpers the tests share, one place each: the pipeline and its probes, the oracle, faults."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]  # the repository's top folder
