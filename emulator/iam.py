"""IAM policies on topics and subscriptions: stored with etags, never enforced.

The rule this module owns is the service's read-modify-write contract: SetIamPolicy with an etag
that is not the current one is ABORTED, without one it overwrites. Nothing here grants or denies
anything: TestIamPermissions answers every permission asked for, as an emulator without
authentication must (Google's own emulator answers UNIMPLEMENTED to all three calls).
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

from google.iam.v1 import iam_policy_pb2, policy_pb2

from emulator.broker import Broker
from emulator.errors import Aborted

# The etag the service answers for a resource that never had a policy ("ACAB" in base64).
EMPTY_ETAG = b"\x00\x20\x01"


class IamPolicies:
    """The three IAMPolicy RPCs, one method each, named as the RPC."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._lock = threading.Lock()  # makes the etag check and the store one step
        self._versions = itertools.count(1)

    def GetIamPolicy(self, r: Any) -> Any:
        return _copy(self._broker.resource(r.resource).policy)

    def SetIamPolicy(self, r: Any) -> Any:
        resource = self._broker.resource(r.resource)
        with self._lock:
            current = resource.policy.etag if resource.policy is not None else EMPTY_ETAG
            if r.policy.etag and r.policy.etag != current:
                # The service's text (DataBiosphere/leonardo#737).
                raise Aborted(
                    "There were concurrent policy changes. Please retry the whole "
                    "read-modify-write with exponential backoff."
                )
            stored = _copy(r.policy)
            stored.version = max(1, stored.version)
            stored.etag = next(self._versions).to_bytes(8, "big")
            resource.policy = stored
            return _copy(stored)

    def TestIamPermissions(self, r: Any) -> Any:
        self._broker.resource(r.resource)
        return iam_policy_pb2.TestIamPermissionsResponse(permissions=r.permissions)


def _copy(policy: Any | None) -> Any:
    out = policy_pb2.Policy(etag=EMPTY_ETAG)
    if policy is not None:
        out.CopyFrom(policy)
    return out
