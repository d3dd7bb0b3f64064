"""Teams and their API keys. The server's own key (the data dir's, `sandboxd api-key`) is the operator's: team
`default`, and it sees and may do everything (every team's sandboxes, the keys, the pools' limits, /metrics,
secrets). Keys made for a team (`sandboxd keys create --team T`, or `POST /admin/teams/T/api-keys`) are kept as
a SHA-256 of the key (a key is 160 random bits: a slow hash would add nothing) and shown once, looked up in the
state when not known here (servers sharing a state share their keys; a revoke elsewhere holds within KEY_TTL). A
caller with one sees only its team's sandboxes, snapshots and volumes (another team's answer 404, as if they did
not exist) and changes only its team's templates (another team's answer 403, as E2B does).

What a team owns: a sandbox (its record's `team`), a volume and a template or snapshot (an owner recorded in the
state DB's settings when made; one with none is `default`'s, the operator's).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sandboxd.core.errors import BadRequest, Forbidden, NotFound
from sandboxd.state.sql import State

DEFAULT_TEAM = "default"
TEAM_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MAX_KEY_NAME = 200
MAX_KEYS = 1000
USED_EVERY = 60.0  # s: a key's last use is written at most this often
KEY_TTL = 2.0  # s: a key known valid is trusted this long before the state is asked again (a revoke elsewhere)
OWNER = "owner:"  # settings "owner:<kind>:<id>" -> team
TEMPLATE, VOLUME = "template", "volume"  # what teams own (besides sandboxes): `kind`s of owner()


@dataclass(frozen=True)
class Caller:
    """Who sent a request: its key's team, the key's ID ("server" for the server's own key), and whether it is
    the operator's."""

    team: str
    key_id: str
    admin: bool

    def sees(self, team: str | None) -> bool:
        return self.admin or (team or DEFAULT_TEAM) == self.team


OPERATOR = Caller(DEFAULT_TEAM, "server", True)


def check_team(team: str) -> str:
    if not isinstance(team, str) or not TEAM_RE.match(team):
        raise BadRequest(
            f"team '{str(team)[:70]}' is not a valid team name: lowercase letters, digits, '_' and '-', "
            "at most 63, starting with a letter or digit"
        )
    return team


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _digest(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()


def _mask(key: str) -> dict[str, Any]:
    """E2B's IdentifierMaskingDetails: what identifies a key without giving it."""
    return {
        "prefix": "e2b_",
        "valueLength": len(key) - 4,
        "maskedValuePrefix": key[4:6],
        "maskedValueSuffix": key[-4:],
    }


class Teams:
    def __init__(self, db: State, server_key: str) -> None:
        self.db = db
        self._server_key = server_key.encode()
        self._lock = threading.Lock()
        # sha256 of a key -> (its ID, its team, until when this is trusted without asking the state again: other
        # servers sharing the state make and revoke keys too)
        self._by_hash: dict[str, tuple[str, str, float]] = {}
        self._used: dict[str, float] = {}  # key ID -> last use written

    # -- who is calling ----------------------------------------------------------------------------
    def caller(self, given: bytes) -> Caller | None:
        """The caller an X-API-KEY value stands for; None: no key of this server."""
        if hmac.compare_digest(given, self._server_key):
            return OPERATOR
        digest = _digest(given)
        now = time.monotonic()
        found = self._by_hash.get(digest)
        if found is None or found[2] <= now:
            row = self.db.key_by_hash(digest)
            if row is None:
                self._by_hash.pop(digest, None)
                return None
            if len(self._by_hash) >= MAX_KEYS * 2:
                self._by_hash.clear()
            found = self._by_hash[digest] = (row[0], row[1], now + KEY_TTL)
        key_id, team, _ = found
        if now - self._used.get(key_id, -USED_EVERY) >= USED_EVERY:
            self._used[key_id] = now
            self.db.key_used(key_id, time.time())
        return Caller(team, key_id, False)

    # -- keys --------------------------------------------------------------------------------------
    def create_key(self, team: str, name: str) -> dict[str, Any]:
        """A new key for `team` (made if new): its description with the key itself (shown this once)."""
        check_team(team)
        if not isinstance(name, str) or len(name) > MAX_KEY_NAME or any(ord(c) < 32 for c in name):
            raise BadRequest(f"a key's name is text of at most {MAX_KEY_NAME} characters, without control characters")
        with self._lock:
            if len(self.db.key_rows()) >= MAX_KEYS:
                raise BadRequest(f"this server has {MAX_KEYS} API keys, its limit: revoke some first")
            key = "e2b_" + secrets.token_hex(20)
            key_id = str(uuid.uuid4())
            now = time.time()
            row = (key_id, team, name or "key", _digest(key.encode()), _mask(key)["maskedValueSuffix"], now, None)
            self.db.key_put(row)
        return {**self._describe(row, key), "key": key}

    def keys(self, team: str | None = None) -> list[dict[str, Any]]:
        """The keys (of one team), described without the key."""
        return [self._describe(r) for r in self.db.key_rows() if team is None or r[1] == team]

    def revoke(self, key_id: str, team: str | None = None) -> None:
        """Delete the key (of `team`, when given): it stops working at once."""
        with self._lock:
            row = next((r for r in self.db.key_rows() if r[0] == key_id), None)
            if row is None or (team is not None and row[1] != team):
                raise NotFound(f"API key '{key_id[:80]}' not found")
            self.db.key_delete(key_id)
            self._by_hash.pop(row[3], None)

    def teams(self) -> list[str]:
        return sorted({DEFAULT_TEAM, *(r[1] for r in self.db.key_rows())})

    @staticmethod
    def _describe(row: tuple, key: str | None = None) -> dict[str, Any]:
        """E2B's TeamAPIKey shape (with the team's ID)."""
        key_id, team, name, _, suffix, created, last = row
        mask = _mask(key) if key else {**_mask("e2b_" + "0" * 40), "maskedValuePrefix": "", "maskedValueSuffix": suffix}
        return {
            "id": key_id,
            "teamID": team,
            "name": name,
            "mask": mask,
            "createdAt": _iso(created),
            "lastUsed": _iso(last),
        }

    # -- what teams own ----------------------------------------------------------------------------
    def owner(self, kind: str, ident: str) -> str:
        return self.db.get_setting(f"{OWNER}{kind}:{ident}") or DEFAULT_TEAM

    def set_owner(self, kind: str, ident: str, team: str) -> None:
        if team == DEFAULT_TEAM:
            self.db.delete_setting(f"{OWNER}{kind}:{ident}")
        else:
            self.db.set_setting(f"{OWNER}{kind}:{ident}", team)

    def claim_owner(self, kind: str, ident: str, team: str) -> str:
        """`team` owns it unless a team owns it already (of two claims at once, one wins): its owner after."""
        return self.db.claim_setting(f"{OWNER}{kind}:{ident}", team)

    def forget(self, kind: str, ident: str) -> None:
        self.db.delete_setting(f"{OWNER}{kind}:{ident}")

    def may_change(self, caller: Caller, kind: str, ident: str, what: str) -> None:
        """Refused (403, E2B's answer for another team's template) unless the caller's team owns it."""
        if not caller.sees(self.owner(kind, ident)):
            raise Forbidden(f"{kind} '{ident}' belongs to another team: it cannot be {what} with this API key")
