"""Resource-name validation with the rules (and error wording) of the real service."""

from __future__ import annotations

import re

from emulator.errors import InvalidArgument

DELETED_TOPIC = "_deleted-topic_"

_ID = re.compile(r"[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}")
_PROJECT = re.compile(r"[A-Za-z0-9\-_.:]{1,100}")


def _check_id(kind: str, name: str, resource_id: str) -> None:
    if not _ID.fullmatch(resource_id) or resource_id.lower().startswith("goog"):
        raise InvalidArgument(f"Invalid [{kind}] name: ({name})")


def parse(name: str, kind: str) -> tuple[str, str]:
    """Split `projects/P/<kind>/ID` into (P, ID), or raise InvalidArgument."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "projects" or parts[2] != kind:
        raise InvalidArgument(f"Invalid [{kind}] name: ({name})")
    if not _PROJECT.fullmatch(parts[1]):
        raise InvalidArgument(f"Invalid [projects] name: ({name})")
    _check_id(kind, name, parts[3])
    return parts[1], parts[3]


def topic(name: str) -> str:
    parse(name, "topics")
    return name


def subscription(name: str) -> str:
    parse(name, "subscriptions")
    return name


def project(name: str) -> str:
    """Validate `projects/P` and return P."""
    parts = name.split("/")
    if len(parts) != 2 or parts[0] != "projects" or not _PROJECT.fullmatch(parts[1]):
        raise InvalidArgument(f"Invalid [projects] name: ({name})")
    return parts[1]
