"""An embedded Google Cloud Pub/Sub emulator that survives subscriber churn.

Serves the Pub/Sub v1 gRPC API (and optionally the REST paths of Google's emulator) so the real
google-cloud-pubsub client works against it through PUBSUB_EMULATOR_HOST.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emulator.errors import EmulatorError
    from emulator.faults import Faults
    from emulator.server import Emulator, EmulatorStartError

__all__ = ["Emulator", "EmulatorError", "EmulatorStartError", "Faults"]

# Imported on first use, so that `python -m emulator` can take a stop before grpc is loaded.
_HOMES = {
    "Emulator": "emulator.server",
    "EmulatorStartError": "emulator.server",
    "EmulatorError": "emulator.errors",
    "Faults": "emulator.faults",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'emulator' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
