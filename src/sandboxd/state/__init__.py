"""Embedded state: SQLite under the data directory."""

from sandboxd.state.db import SandboxRecord, StateDB

__all__ = ["SandboxRecord", "StateDB"]
