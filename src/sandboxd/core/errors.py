"""Errors of the core layer; the API layer turns each into one HTTP status."""


class SandboxdError(Exception):
    status = 500


class NotFound(SandboxdError):
    status = 404


class BadRequest(SandboxdError):
    status = 400


class Conflict(SandboxdError):
    status = 409
