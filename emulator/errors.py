"""The emulator's error taxonomy: each error names the canonical status the real service returns."""

from __future__ import annotations


class EmulatorError(Exception):
    """Base class; `code` is the canonical gRPC status name, `http_status` its REST mapping."""

    code = "INTERNAL"
    http_status = 500


class InvalidArgument(EmulatorError):
    code = "INVALID_ARGUMENT"
    http_status = 400


class NotFound(EmulatorError):
    code = "NOT_FOUND"
    http_status = 404


class AlreadyExists(EmulatorError):
    code = "ALREADY_EXISTS"
    http_status = 409


class FailedPrecondition(EmulatorError):
    code = "FAILED_PRECONDITION"
    http_status = 400


class Unavailable(EmulatorError):
    code = "UNAVAILABLE"
    http_status = 503


class Aborted(EmulatorError):
    code = "ABORTED"
    http_status = 409
