"""An embedded Google Cloud Pub/Sub emulator that survives subscriber churn.

Serves the Pub/Sub v1 gRPC API (and optionally the REST paths of Google's emulator) so the real
google-cloud-pubsub client works against it through PUBSUB_EMULATOR_HOST.
"""

from __future__ import annotations

from emulator.errors import EmulatorError
from emulator.faults import Faults
from emulator.server import Emulator, EmulatorStartError

__all__ = ["Emulator", "EmulatorError", "EmulatorStartError", "Faults"]
