"""Errors of the volumes layer, each with the HTTP status the API answers it with."""

from __future__ import annotations


class VolumeError(Exception):
    status = 400


class NotFound(VolumeError):
    status = 404


class Conflict(VolumeError):
    status = 409


class NoSpace(VolumeError):
    status = 507


class TooMany(VolumeError):
    status = 429


class Elsewhere(VolumeError):
    """The volume's files are another node's (a cluster: volumes/store.py)."""

    status = 409
