"""SQLite state: the API key and every live sandbox, so a restarted server can re-adopt or clean up."""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    template_id TEXT NOT NULL,
    state TEXT NOT NULL,
    started_at REAL NOT NULL,
    end_at REAL NOT NULL,
    record TEXT NOT NULL
);
-- sandboxes that ended, why and when (core/endings.py), kept for a while after
CREATE TABLE IF NOT EXISTS ended (
    id TEXT PRIMARY KEY,
    ended_at REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS secrets (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    version INTEGER NOT NULL,
    value TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
-- API keys of teams (core/teams.py): only a hash of each key is kept
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    team TEXT NOT NULL,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    mask TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_used REAL
);
-- volumes (volumes/store.py): their files are in <data>/volumes/<id>
CREATE TABLE IF NOT EXISTS volumes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL
);
"""


@dataclass
class SandboxRecord:
    sandbox_id: str
    template_id: str
    alias: str | None
    client_id: str
    envd_token: str
    started_at: float
    end_at: float
    state: str  # running | paused | killing (a kill began: never re-adopted after a crash)
    team: str = "default"  # the team of the API key that made it (core/teams.py): no other team's key sees it
    metadata: dict[str, str] = field(default_factory=dict)
    env_vars: dict[str, str] = field(default_factory=dict)
    cpu_count: int = 1
    memory_mb: int = 512
    disk_mb: int = 0
    auto_pause: bool = False
    auto_pause_memory: bool = True  # its auto-pause keeps its memory (False: to its files)
    idle_timeout: int = 0  # s without a request or CPU use, then paused (autoPause) or killed; 0: none
    default_user: str = "user"
    default_workdir: str = "/home/user"
    handle: dict = field(default_factory=dict)  # the runtime's SandboxHandle, as JSON
    network: dict = field(default_factory=dict)  # its network policy (network/policy.py, NetworkPolicy.to_json)
    allow_internet_access: bool = True
    traffic_token: str | None = None  # set when its ports are not public (network.allowPublicTraffic: false)
    mask_request_host: str | None = None  # the Host its services see (${PORT} replaced)
    auto_resume: bool = False  # a request to one of its ports resumes it when paused
    iam_tokens: dict = field(default_factory=dict)  # workload identity: {name: {audience, tokenType}}
    layers: list = field(default_factory=list)  # its root filesystem's layers (paths, topmost first)
    # while paused: "full" (its processes frozen, in memory) or "filesystem" (stopped, files kept)
    pause_mode: str = ""
    volume_mounts: list = field(default_factory=list)  # [{name, path, volumeID}]: mounted at create
    # written to disk by the server's shutdown (--pause-on-exit) while it ran: the next start resumes it, with
    # this many seconds to live (what it had left)
    resume_at_start: int = 0


class StateDB:
    def __init__(self, path: Path, create: bool = True) -> None:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.is_file():
            raise FileNotFoundError(f"no state database at {path}")
        # The API key and every sandbox's access token are in here: root only (SQLite gives its -wal
        # and -shm files the database file's mode).
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)
        os.close(fd)
        for side in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            if side.exists():
                os.chmod(side, 0o600)
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(SCHEMA)

    def close(self) -> None:
        self._conn.close()

    # -- settings ----------------------------------------------------------------------------
    def get_setting(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_setting(self, key: str, value: str) -> None:
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value))

    def settings_under(self, prefix: str) -> dict[str, str]:
        """The settings whose key starts with `prefix` (the prefix taken off)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT key, value FROM settings WHERE substr(key, 1, ?) = ?", (len(prefix), prefix)
            ).fetchall()
        return {key[len(prefix) :]: value for key, value in rows}

    def delete_setting(self, key: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM settings WHERE key = ?", (key,))

    def api_key(self) -> tuple[str, bool]:
        """The server's API key, creating it on first use. Returns (key, created)."""
        key = self.get_setting("api_key")
        if key:
            return key, False
        # e2b_ + 40 hex: accepted by every SDK version, including those that validate the format.
        key = "e2b_" + secrets.token_hex(20)
        self.set_setting("api_key", key)
        return key, True

    # -- API keys of teams (core/teams.py) --------------------------------------------------------
    KEY_COLUMNS = "id, team, name, hash, mask, created_at, last_used"

    def key_put(self, row: tuple) -> None:
        with self._lock:
            self._conn.execute(f"INSERT INTO api_keys ({self.KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)", row)

    def key_rows(self) -> list[tuple]:
        with self._lock:
            return self._conn.execute(f"SELECT {self.KEY_COLUMNS} FROM api_keys ORDER BY created_at").fetchall()

    def key_delete(self, key_id: str) -> bool:
        with self._lock:
            return self._conn.execute("DELETE FROM api_keys WHERE id = ?", (key_id,)).rowcount > 0

    def key_used(self, key_id: str, when: float) -> None:
        with self._lock:
            self._conn.execute("UPDATE api_keys SET last_used = ? WHERE id = ?", (when, key_id))

    # -- secrets (values are written, and read only by the egress proxy: core/secrets.py) ----------
    def secret_row(self, key: str) -> tuple | None:
        """(id, name, version, value, metadata JSON, created_at, updated_at) by ID or name."""
        with self._lock:
            return self._conn.execute(
                "SELECT id, name, version, value, metadata, created_at, updated_at FROM secrets "
                "WHERE id = ? OR name = ?",
                (key, key),
            ).fetchone()

    def secret_rows(self) -> list[tuple]:
        with self._lock:
            return self._conn.execute(
                "SELECT id, name, version, value, metadata, created_at, updated_at FROM secrets ORDER BY created_at, id"
            ).fetchall()

    def secret_put(self, row: tuple) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO secrets (id, name, version, value, metadata, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                row,
            )

    def secret_delete(self, secret_id: str) -> bool:
        with self._lock:
            return self._conn.execute("DELETE FROM secrets WHERE id = ?", (secret_id,)).rowcount > 0

    # -- volumes -----------------------------------------------------------------------------
    def put_volume(self, body: dict) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT INTO volumes (id, name, body) VALUES (?, ?, ?)",
                (body["volume_id"], body["name"], json.dumps(body)),
            )

    def delete_volume(self, volume_id: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM volumes WHERE id = ?", (volume_id,))

    def volume(self, ref: str) -> dict | None:
        """A volume by its ID or its name."""
        with self._lock:
            row = self._conn.execute(  # an ID wins over a name that spells another volume's ID
                "SELECT body FROM volumes WHERE id = ? OR name = ? ORDER BY id = ? DESC LIMIT 1", (ref, ref, ref)
            ).fetchone()
        return json.loads(row[0]) if row else None

    def all_volumes(self) -> list[dict]:
        """Oldest first."""
        with self._lock:
            rows = self._conn.execute("SELECT body FROM volumes ORDER BY rowid").fetchall()
        return [json.loads(r[0]) for r in rows]

    # -- sandboxes ---------------------------------------------------------------------------
    def put(self, rec: SandboxRecord) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT OR REPLACE INTO sandboxes (id, template_id, state, started_at, end_at, record) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (rec.sandbox_id, rec.template_id, rec.state, rec.started_at, rec.end_at, json.dumps(asdict(rec))),
            )

    def delete(self, sandbox_id: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))

    def end(self, sandbox_id: str, ended_at: float, body: dict) -> None:
        """The sandbox is gone: its record goes and what ended it is kept, in one transaction."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))
                self._conn.execute(
                    "INSERT OR REPLACE INTO ended (id, ended_at, body) VALUES (?, ?, ?)",
                    (sandbox_id, ended_at, json.dumps(body)),
                )
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def ended(self, sandbox_id: str) -> dict | None:
        with self._lock:
            row = self._conn.execute("SELECT body FROM ended WHERE id = ?", (sandbox_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def all_ended(self) -> list[dict]:
        """Newest first."""
        with self._lock:
            rows = self._conn.execute("SELECT body FROM ended ORDER BY ended_at DESC").fetchall()
        return [json.loads(r[0]) for r in rows]

    def forget_ended(self, before: float) -> int:
        with self._lock:
            return self._conn.execute("DELETE FROM ended WHERE ended_at < ?", (before,)).rowcount

    def all(self) -> list[SandboxRecord]:
        with self._lock:
            rows = self._conn.execute("SELECT record FROM sandboxes").fetchall()
        return [SandboxRecord(**json.loads(r[0])) for r in rows]
