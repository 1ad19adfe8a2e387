"""processor."""

from __future__ import annotations


def version() -> str:
    """The installed mini-scan's version (pyproject.toml), or "unknown" outside an install."""
    from importlib import metadata

    try:
        return metadata.version("mini-scan")
    except metadata.PackageNotFoundError:
        return "unknown"
