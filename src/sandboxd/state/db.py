"""SQLite state (the default, embedded): the API key and every live sandbox, so a restarted server can re-adopt or
clean up, and the rest of state/sql.py's interface. One file in the data dir, root only, in WAL mode."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from sandboxd.state.migrations import migrate
from sandboxd.state.records import SandboxRecord
from sandboxd.state.sql import Params, State, Tx

__all__ = ["SandboxRecord", "StateDB"]


class _SqliteTx(Tx):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Params = ()) -> int:
        return self.conn.execute(sql, tuple(params)).rowcount

    def query(self, sql: str, params: Params = ()) -> list[tuple]:
        return self.conn.execute(sql, tuple(params)).fetchall()


class StateDB(State):
    dialect = "sqlite"

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
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._lock = threading.RLock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
        migrate(self)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteTx(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def execute(self, sql: str, params: Params = ()) -> int:  # (one statement: atomic by itself)
        with self._lock:
            return self._conn.execute(sql, tuple(params)).rowcount

    def query(self, sql: str, params: Params = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, tuple(params)).fetchall()

    def now(self) -> float:
        return time.time()

    def close(self) -> None:
        self._conn.close()
