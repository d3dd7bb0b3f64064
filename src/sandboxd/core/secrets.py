"""Secrets: named values the egress proxy puts into requests (`${e2b.secrets.NAME}` in a sandbox's
`network.rules`), so that they never enter a sandbox. E2B's /secrets API: values are write-only (no
read surface returns them); each update makes a new version; the proxy always uses the current one,
looked up when it sends a request.
"""

from __future__ import annotations

import json
import re
import secrets as _random
import time
from dataclasses import dataclass
from typing import Any

from sandboxd.core.errors import BadRequest, Conflict, NotFound
from sandboxd.state.sql import State

MAX_VALUE = 64 * 1024
MAX_SECRETS = 1024
MAX_METADATA = 64
# What a name that goes into a ${e2b.*.NAME} placeholder may not hold (secrets, workload identity tokens).
UNUSABLE_IN_PLACEHOLDER = re.compile(r"[{}\x00-\x1f\x7f]")
PLACEHOLDER = re.compile(r"\$\{e2b\.secrets\.([^{}\x00-\x1f\x7f]+)\}")


@dataclass
class SecretInfo:
    secret_id: str
    name: str
    version: int
    metadata: dict[str, str]
    created_at: float
    updated_at: float


def _info(row: tuple) -> SecretInfo:
    return SecretInfo(row[0], row[1], row[2], json.loads(row[4]), row[5], row[6])


def _check_metadata(metadata: Any) -> dict[str, str]:
    if metadata is None:
        return {}
    if (
        not isinstance(metadata, dict)
        or len(metadata) > MAX_METADATA
        or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 256 and len(v) <= 4096 for k, v in metadata.items()
        )
    ):
        raise BadRequest(f"metadata must be an object of at most {MAX_METADATA} short string keys and values")
    return dict(metadata)


def _check_value(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_VALUE or any(c in value for c in "\r\n\0"):
        raise BadRequest(f"value must be a non-empty string of at most {MAX_VALUE} characters without CR, LF or NUL")
    return value


class Secrets:
    def __init__(self, db: State) -> None:
        self.db = db

    def create(self, name: Any, value: Any, metadata: Any = None) -> SecretInfo:
        if not isinstance(name, str) or not name or len(name) > 256 or UNUSABLE_IN_PLACEHOLDER.search(name):
            raise BadRequest(
                "name must be a non-empty string of at most 256 characters without '{', '}' or control "
                "characters (it goes into the ${e2b.secrets.<name>} placeholder)"
            )
        value, meta = _check_value(value), _check_metadata(metadata)
        if self.db.secret_row(name) is not None:
            raise Conflict(f"a secret named '{name}' exists: update it, or destroy it first")
        if len(self.db.secret_rows()) >= MAX_SECRETS:
            raise BadRequest(f"this server keeps at most {MAX_SECRETS} secrets")
        now = time.time()
        row = ("sec_" + _random.token_hex(10), name, 1, value, json.dumps(meta), now, now)
        self.db.secret_put(row)
        return _info(row)

    def update(self, key: str, value: Any, metadata: Any = None) -> SecretInfo:
        row = self._row(key)
        value = _check_value(value)
        meta = _check_metadata(metadata) if metadata is not None else json.loads(row[4])
        new = (row[0], row[1], row[2] + 1, value, json.dumps(meta), row[5], time.time())
        self.db.secret_put(new)
        return _info(new)

    def get(self, key: str) -> SecretInfo:
        return _info(self._row(key))

    def list(self) -> list[SecretInfo]:
        return [_info(r) for r in self.db.secret_rows()]

    def destroy(self, key: str) -> bool:
        row = self.db.secret_row(key)
        return row is not None and self.db.secret_delete(row[0])

    def value(self, name: str) -> str | None:
        """The current value (for the egress proxy only)."""
        row = self.db.secret_row(name)
        return None if row is None else row[3]

    def fill(self, text: str) -> str:
        """`text` with every ${e2b.secrets.NAME} replaced by the secret's value; KeyError names a missing one."""

        def one(m: re.Match[str]) -> str:
            value = self.value(m.group(1))
            if value is None:
                raise KeyError(m.group(1))
            return value

        return PLACEHOLDER.sub(one, text)

    def _row(self, key: str) -> tuple:
        row = self.db.secret_row(key)
        if row is None:
            raise NotFound(f"secret '{key}' not found")
        return row
