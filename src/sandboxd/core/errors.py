"""Errors of the core layer; the API layer turns each into one HTTP status."""


class SandboxdError(Exception):
    status = 500


class NotFound(SandboxdError):
    status = 404


class BadRequest(SandboxdError):
    status = 400


class Forbidden(SandboxdError):
    status = 403


class Conflict(SandboxdError):
    status = 409


class PayloadTooLarge(SandboxdError):
    status = 413


class LimitReached(SandboxdError):
    """A host-wide limit (sandboxes, memory, PIDs) is reached: try again later or raise the limit."""

    status = 429
